"""The send timeout, in memory: a client that stops taking a response is cut, a slow one is not."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from dockmirror.connections import ConnectionLimits, socket_progress
from dockmirror.metrics import Metrics
from dockmirror.web import MirrorChannel, MirrorSite

SEND_TIMEOUT = 8.0


class SocketTransport(StringTransport):
    """A transport whose socket the test fills and drains."""

    queued = 0
    taken = 0


def progress(transport: SocketTransport) -> tuple[int, int] | None:
    return transport.queued, transport.taken


@implementer(IPushProducer)
class Body:
    """A large body, as a blob reader writes it: paused and resumed by the client."""

    def __init__(self) -> None:
        self.stopped = False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


class Blob(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-length", b"%d" % (100 << 20))
        request.registerProducer(self.body, True)
        request.write(b"x" * (1 << 20))
        return NOT_DONE_YET


def connect(clock: MemoryReactorClock) -> tuple[Any, SocketTransport, Blob]:
    blob = Blob()
    limits = ConnectionLimits(10, 10)
    site = MirrorSite(blob, Metrics(), limits=limits, send_timeout=SEND_TIMEOUT)
    site.reactor = clock
    site.protocol = lambda: MirrorChannel(  # type: ignore[method-assign]
        limits, 10, clock, SEND_TIMEOUT, progress
    )
    address = IPv4Address("TCP", "10.0.0.1", 1234)
    protocol = site.buildProtocol(address)
    transport = SocketTransport(peerAddress=address)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /v2/x/blobs/sha256:00 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    return protocol, transport, blob


def test_a_client_that_stops_reading_is_aborted_and_its_reader_released() -> None:
    clock = MemoryReactorClock()
    protocol, transport, blob = connect(clock)
    transport.queued = 2 << 20  # the socket is full; the client takes nothing more
    with capturedLogs() as events:
        clock.pump([1.0] * int(SEND_TIMEOUT))
        assert not transport.disconnecting
        clock.pump([1.0] * int(SEND_TIMEOUT))
    assert transport.disconnecting
    (event,) = [e for e in events if "send_timeout" in e["log_format"]]
    assert (event["client"], event["queued"]) == ("client 10.0.0.1", 2 << 20)
    transport.producer.stopProducing()  # as a TCP transport does when it is closed
    protocol.connectionLost(Failure(ConnectionError("aborted")))
    assert blob.body.stopped
    assert not [c for c in clock.getDelayedCalls() if c.active() and "_check" in repr(c.func)]


def test_a_slow_client_that_keeps_taking_bytes_is_never_cut() -> None:
    clock = MemoryReactorClock()
    protocol, transport, blob = connect(clock)
    transport.queued = 2 << 20
    for _ in range(100):
        clock.advance(SEND_TIMEOUT - 1)
        transport.taken += 1  # one byte acknowledged
    assert not transport.disconnecting and not blob.body.stopped
    protocol.connectionLost(Failure(ConnectionError("gone")))


def test_nothing_queued_is_no_stall_and_the_watch_ends_with_the_response() -> None:
    clock = MemoryReactorClock()
    protocol, transport, blob = connect(clock)
    clock.pump([SEND_TIMEOUT] * 5)  # the socket took everything: waiting on the producer
    assert not transport.disconnecting
    protocol.requests[0].unregisterProducer()
    protocol.requests[0].finish()
    clock.pump([SEND_TIMEOUT] * 2)
    assert not protocol._sending._loop.running
    protocol.connectionLost(Failure(ConnectionError("done")))


def test_a_transport_without_a_tcp_socket_reports_nothing() -> None:
    assert socket_progress(StringTransport()) is None
