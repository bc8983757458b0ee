"""Client connections: how many are served, and how long a request may take to arrive.

A mirror on a shared network must not let a few clients hold every socket
(slowloris: connections that send a header byte every few seconds).  Each
connection has :attr:`header_timeout` seconds from the first byte of a
request to its last (line, headers and body; only small bodies are ever
accepted), and a client address (an IPv6 /64) may hold only so many
connections, out of a total.  Connections over a limit are answered 503 and
closed at once, so their sockets are not held either.

The limits are the whole service's: with worker processes, each worker
serves an equal share of each (rounded down, at least one), so that all
workers together never exceed them.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from dockmirror.auth.throttle import client_subject
from dockmirror.errors import RegistryError
from dockmirror.streaming import IdleTimer

log = Logger()

#: Seconds between two log lines about refused connections.
WARN_INTERVAL = 60.0

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
            self.transport.abortConnection()
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
    """An HTTP channel that counts itself and times out slow requests.

    The deadline starts with the first byte of a request and ends when the
    whole request is in; the idle time between requests on a keep-alive
    connection is governed by the site's idle timeout.
    """

    def __init__(
        self, limits: ConnectionLimits, header_timeout: float, reactor: IReactorTime
    ) -> None:
        super().__init__()
        self._limits = limits
        self._deadline = IdleTimer(reactor, header_timeout, self._too_slow)
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
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._deadline.stop()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._busy = False
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._deadline.stop()
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
