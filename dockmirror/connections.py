"""Client connections: how many are served, and how long a request or a response may stall.

A mirror on a shared network must not let a few clients hold every socket
(slowloris: connections that send a header byte every few seconds).  Each
connection has :attr:`header_timeout` seconds from the first byte of a
request to its last (line, headers and body; only small bodies are ever
accepted), and a client address (an IPv6 /64) may hold only so many
connections, out of a total.  Connections over a limit are answered 503 and
closed at once, so their sockets are not held either.

A client that asks for a large blob and then stops reading would hold its
connection, and the blob's reader, forever: :class:`SendWatch` aborts a
connection whose socket has bytes to send and had none of them taken by the
client for ``send_timeout`` seconds.  It watches the socket itself (the
kernel's send queue and the bytes the client acknowledged), so it sees every
response alike: written by Twisted, through TLS, or by ``sendfile``.

The limits are the whole service's: with worker processes, each worker
serves an equal share of each (rounded down, at least one), so that all
workers together never exceed them.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import tcp
from twisted.internet.interfaces import (
    IAddress,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from dockmirror.auth.throttle import client_subject
from dockmirror.errors import RegistryError
from dockmirror.streaming import IdleTimer

log = Logger()

#: Seconds between two log lines about refused connections.
WARN_INTERVAL = 60.0

#: Checks of a stalled send per ``send_timeout``.
SEND_CHECKS = 4
#: Where ``struct tcp_info`` (linux/tcp.h) holds ``tcpi_bytes_acked``.
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_AT = 120

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def _subject(address: IAddress | None) -> str:
    return client_subject(str(getattr(address, "host", "-")))


class ConnectionLimits:
    """Counts open connections, in total and per client address.

    *total* and *per_client* are the service's limits, of which this
    process, one of *workers*, serves its share.
    """

    def __init__(self, total: int, per_client: int, workers: int = 1) -> None:
        self.total = worker_share(total, workers)
        self.per_client = worker_share(per_client, workers)
        self._whose = "server." if workers == 1 else f"this worker's share (1/{workers}) of server."
        self._open: Counter[str] = Counter()
        self._count = 0
        self._refused = 0
        self._warned = -WARN_INTERVAL

    def __repr__(self) -> str:
        return f"<ConnectionLimits {self._count}/{self.total} open, {self.per_client} per client>"

    def refusal(self, address: IAddress | None) -> str | None:
        """Why a new connection from *address* is refused, or None to serve it."""
        subject = _subject(address)
        if self._count >= self.total:
            reason = f"{self.total} connections are open ({self._whose}max_connections)"
        elif self._open[subject] >= self.per_client:
            reason = (
                f"{subject} has {self.per_client} connections open"
                f" ({self._whose}max_connections_per_client)"
            )
        else:
            return None
        self._refused += 1
        now = time.monotonic()
        if now - self._warned >= WARN_INTERVAL:
            log.warn(
                "refused {count} connections in the last {interval:.0f}s, the last because"
                " {reason}",
                count=self._refused,
                interval=min(now - self._warned, WARN_INTERVAL),
                reason=reason,
            )
            self._warned, self._refused = now, 0
        return reason

    def opened(self, address: IAddress | None) -> None:
        self._open[_subject(address)] += 1
        self._count += 1

    def closed(self, address: IAddress | None) -> None:
        subject = _subject(address)
        self._open[subject] -= 1
        if self._open[subject] <= 0:
            del self._open[subject]
        self._count -= 1


#: How a connection's sending stands: bytes queued and not yet taken by the
#: client, and a count that grows whenever the client takes some; None when
#: the transport cannot tell.
SendProgress = Callable[[Any], "tuple[int, int] | None"]


def socket_progress(transport: Any) -> tuple[int, int] | None:
    """The :data:`SendProgress` of the TCP socket under *transport* (Linux).

    Protocol wrappers and TLS are looked through.  The queued bytes are the
    kernel's send queue (sent and unacknowledged, or not sent yet): Twisted's
    own buffers only fill once it is full.  The count is the bytes the client
    acknowledged, so a client taking one byte is progress.
    """
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    if not isinstance(transport, tcp.Connection) or not transport.connected:
        return None
    try:
        queue = fcntl.ioctl(transport.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        info = transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED_AT + _BYTES_ACKED.size:
        return None  # a kernel too old to count acknowledged bytes
    (queued,) = struct.unpack("=i", queue)
    (acked,) = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)
    return queued, acked


class SendWatch:
    """Calls *stalled* when a connection has bytes to send and the client took none for *timeout*.

    Between :meth:`start` and :meth:`stop`, the connection's
    :data:`SendProgress` is checked :data:`SEND_CHECKS` times per timeout;
    the watch stops by itself once nothing is queued and *busy* says no
    request is in flight.  A client that takes bytes, however slowly, is
    never stalled.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        timeout: float,
        progress: Callable[[], tuple[int, int] | None],
        busy: Callable[[], bool],
        stalled: Callable[[int], None],
    ) -> None:
        self.timeout = timeout
        self._reactor = reactor
        self._progress = progress
        self._busy = busy
        self._stalled = stalled
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor
        self._since: float | None = None
        self._taken = 0

    def start(self) -> None:
        if not self._loop.running:
            self._since = None
            self._loop.start(self.timeout / SEND_CHECKS, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        progress = self._progress()
        now = self._reactor.seconds()
        if progress is None or progress[0] <= 0:
            self._since = None
            if not self._busy():
                self.stop()
            return
        queued, taken = progress
        if self._since is None or taken != self._taken:
            self._since, self._taken = now, taken
        elif now - self._since >= self.timeout:
            self.stop()
            self._stalled(queued)


def worker_share(limit: int, workers: int) -> int:
    """One worker's share of a service-wide *limit*: all shares add up to no more."""
    return max(1, limit // workers)


class Refused(Protocol):
    """Answers a connection over the limits with a 503 and closes it.

    A TLS connection is cut before its handshake: answering it would cost
    the handshake, which is what a flood of connections wants to spend.
    """

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def connectionMade(self) -> None:
        assert self.transport is not None
        if ISSLTransport.providedBy(self.transport):
            cast(ITCPTransport, self.transport).abortConnection()
            return
        body = RegistryError(
            "UNAVAILABLE", "too many connections; try again later", {"reason": self._reason}
        ).body()
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 5\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        self.transport.loseConnection()


class GuardedChannel(HTTPChannel):
    """An HTTP channel that counts itself and times out slow requests and stalled responses.

    The deadline starts with the first byte of a request and ends when the
    whole request is in; the idle time between requests on a keep-alive
    connection is governed by the site's idle timeout.  From a request on,
    a :class:`SendWatch` aborts the connection if the client stops taking
    its response.
    """

    def __init__(
        self,
        limits: ConnectionLimits,
        header_timeout: float,
        reactor: IReactorTime,
        send_timeout: float,
        progress: SendProgress = socket_progress,
    ) -> None:
        super().__init__()
        self._limits = limits
        self._deadline = IdleTimer(reactor, header_timeout, self._too_slow)
        self._sending = SendWatch(
            reactor,
            send_timeout,
            lambda: progress(self.transport),
            lambda: self._busy,
            self._stalled,
        )
        self._busy = False
        self._peer: IAddress | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._peer = self.transport.getPeer() if self.transport is not None else None
        self._limits.opened(self._peer)

    def dataReceived(self, data: bytes) -> None:
        if not self._busy and data:
            self._deadline.start()  # a no-op while it runs
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._busy = True
        self._sending.start()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._deadline.stop()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._busy = False
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._deadline.stop()
        self._sending.stop()
        self._limits.closed(self._peer)
        super().connectionLost(reason)

    def _too_slow(self) -> None:
        self._busy = True  # no new deadline for what arrives while closing
        log.info(
            "closing {client}: no whole request within {timeout:.0f}s (server.header_timeout)",
            client=_subject(self._peer),
            timeout=self._deadline.timeout,
        )
        if self.transport is not None:
            self.transport.write(_TIMED_OUT)
            self.loseConnection()

    def _stalled(self, queued: int) -> None:
        log.info(
            "aborting {client}: it took none of {queued} queued response bytes"
            " in {timeout:.0f}s (server.send_timeout)",
            client=_subject(self._peer),
            queued=queued,
            timeout=self._sending.timeout,
        )
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()
