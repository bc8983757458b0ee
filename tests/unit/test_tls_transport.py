"""The TLS transport of the listeners: whole writes into OpenSSL, same bytes out.

Real sockets on loopback: a server listening through :class:`TLSFactory` and
a Twisted TLS client.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from dockmirror.tls import TLS_WRITE, ReloadingContextFactory, TLSFactory, WholeRecordsTLS
from tests.integration.clients import make_server_tls

BODY = os.urandom(3 * TLS_WRITE * 4 + 12345)


class Sender(Protocol):
    """Writes :data:`BODY` in one write once connected, then closes."""

    transports: list[Any] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        Sender.transports.append(self.transport)
        self.transport.write(BODY)
        self.transport.loseConnection()


class Receiver(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.closed.callback(None)


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts each ``SSL.Connection.send`` of the server took."""
    calls: list[int] = []
    real = SSL.Connection.send

    def spy(self: SSL.Connection, buf: Any, flags: int = 0) -> int:
        sent = real(self, buf, flags)
        if not self.get_context().get_verify_mode():  # the server's: it verifies nobody
            calls.append(sent)
        return sent

    monkeypatch.setattr(SSL.Connection, "send", spy)
    return calls


async def fetch(tmp_path: Path) -> bytes:
    tls = make_server_tls(tmp_path, "localhost")
    context = ReloadingContextFactory(str(tls.key), str(tls.certificate))
    port = reactor.listenTCP(
        0, TLSFactory(context, Factory.forProtocol(Sender)), interface="127.0.0.1"
    )
    try:
        client = Receiver()
        options = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(tls.ca.read_bytes()))
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, options)
        await connectProtocol(endpoint, client)
        await client.closed
        return bytes(client.received)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_large_write_arrives_whole_in_few_calls_into_openssl(tmp_path, sends):
    assert await fetch(tmp_path) == BODY
    body_calls = [n for n in sends if n > 1024]
    assert sum(body_calls) == len(BODY)
    # 16 KiB per call, as Twisted's own transport does, would take 4 times as many.
    assert len(body_calls) <= -(-len(BODY) // TLS_WRITE)


@pytest_twisted.ensureDeferred
async def test_the_transport_is_an_ssl_transport(tmp_path):
    Sender.transports.clear()
    await fetch(tmp_path)
    (transport,) = Sender.transports
    assert isinstance(transport, WholeRecordsTLS)
    assert ISSLTransport.providedBy(transport)
