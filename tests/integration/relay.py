"""A fault-injecting HTTP relay on loopback, between dockmirror and a real upstream.

:class:`Relay` listens on 127.0.0.1 and forwards each connection to a target
(a ``docker-registry``).  It reads each request's head, records its request
line and forces ``Connection: close``, so every connection carries exactly one
request and a :class:`Fault` picked by the request line applies to exactly
one response.  A fault can

- ``hold`` the response until :meth:`Relay.release` (nothing reaches the
  client before then: several clients are surely in flight at once);
- cap the body's ``rate`` in bytes per second (a fill lasts as long as the
  test needs);
- ``stall_after`` so many body bytes (an upstream that hangs, 0: right after
  the headers), until the relay stops;
- ``cut_after`` so many body bytes (a truncated body: the connection closes);
- ``flip`` the body byte at an offset (wrong bytes for the digest).

A fault may also require a ``header`` in the request's head (a ``Range``),
and apply to its first ``times`` matching responses only.

Body offsets count the bytes after the response head as they are on the
wire: for a chunked response they include the chunk framing.  Requests that
match no fault are relayed untouched.  Each connection is served by its own
threads; :meth:`Relay.stop` closes every socket and joins them.  (The relay
of :mod:`.upstream_servers` answers at the HTTP level instead: redirects,
challenges, made-up bodies.)

Example::

    with Relay(registry.port) as relay:
        relay.faults.append(Fault(r"^GET /v2/.*/blobs/", rate=1 << 20))
        mirror = dockmirror({"hub": {"plugin": "registry", "url": relay.url, "default": True}})
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .registries import LOOPBACK, _Running, wait_until

#: The largest request head the relay reads (dockmirror sends GETs and HEADs).
MAX_HEAD = 64 * 1024
_CHUNK = 64 * 1024
_CONNECTION_HEADER = re.compile(rb"^(connection|keep-alive):", re.IGNORECASE)


@dataclass
class Fault:
    """What to do to responses whose request line (``GET /v2/... HTTP/1.1``) matches."""

    match: str = ""
    hold: bool = False
    rate: float | None = None
    stall_after: int | None = None
    cut_after: int | None = None
    flip: int | None = None
    #: A regular expression the request's head must match too (``Range: bytes=0-``).
    header: str | None = None
    #: Responses it applies to, the first ones that match; None: all.
    times: int | None = None

    def applies_to(self, request_line: str, head: str = "") -> bool:
        if re.search(self.match, request_line) is None:
            return False
        if self.header is not None and not re.search(self.header, head, re.I | re.M):
            return False
        if self.times is not None:
            if self.times == 0:
                return False
            self.times -= 1
        return True


class Relay(_Running):
    """A threaded TCP relay to ``127.0.0.1:target_port`` that sees each HTTP request."""

    def __init__(self, target_port: int, target_host: str = LOOPBACK) -> None:
        self.target = (target_host, target_port)
        self.faults: list[Fault] = []
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()
        self._stopping = threading.Event()
        self._requests: list[str] = []
        self._heads: list[str] = []
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._held = 0

    # --- what the tests see ---------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def requests(self) -> list[str]:
        """The request lines received so far, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def heads(self) -> list[str]:
        """The request heads (request line and headers) received so far, in order."""
        with self._lock:
            return list(self._heads)

    def count(self, pattern: str) -> int:
        """How many request lines so far match the regular expression ``pattern``."""
        return sum(1 for line in self.requests if re.search(pattern, line))

    @property
    def held(self) -> int:
        """How many responses are waiting for :meth:`release` right now."""
        with self._lock:
            return self._held

    def wait_for(self, predicate: Callable[[Relay], bool], timeout: float = 10.0) -> None:
        """Poll ``predicate(self)`` until true; TimeoutError after ``timeout`` seconds."""
        wait_until(lambda: predicate(self), timeout, interval=0.01)

    def hold(self) -> None:
        """From now on, responses of ``hold`` faults wait for :meth:`release`."""
        self._released.clear()

    def release(self) -> None:
        """Let held responses go (and later ones pass without waiting)."""
        self._released.set()

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        thread = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Close the listener and every relayed connection; join the threads."""
        self._stopping.set()
        self._released.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)
        for thread in list(self._threads):
            thread.join(timeout=10)

    # --- relaying ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(
                target=self._serve, args=(client,), name="relay-connection", daemon=True
            )
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(sock)
        if self._stopping.is_set():
            _shutdown(sock)
        return sock

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            self._track(client)
            head, rest = _read_head(client)
            if head is None:
                return
            text = head.decode("latin-1")
            request_line = text.split("\r\n", 1)[0]
            with self._lock:
                fault = next((f for f in self.faults if f.applies_to(request_line, text)), None)
                self._requests.append(request_line)
                self._heads.append(text)
            upstream = self._track(socket.create_connection(self.target, timeout=30))
            upstream.settimeout(None)
            upstream.sendall(_close_after(head) + rest)
            pump = threading.Thread(
                target=_pump, args=(client, upstream), name="relay-request", daemon=True
            )
            with self._lock:
                self._threads.append(pump)
            pump.start()
            self._respond(upstream, client, fault or Fault())
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    _shutdown(sock)
                    sock.close()
                    with self._lock:
                        self._sockets.discard(sock)

    def _respond(self, upstream: socket.socket, client: socket.socket, fault: Fault) -> None:
        """Relay one response from ``upstream`` to ``client``, applying ``fault``."""
        if fault.hold:
            with self._lock:
                self._held += 1
            try:
                while not self._released.wait(0.05):
                    if self._stopping.is_set():
                        return
            finally:
                with self._lock:
                    self._held -= 1
        head = b""
        offset: int | None = None  # body bytes sent; None while in the head
        while not self._stopping.is_set():
            data = upstream.recv(_CHUNK)
            if not data:
                return
            if offset is None:
                head += data
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    if len(head) > MAX_HEAD:
                        return
                    continue
                client.sendall(head[: end + 4])
                data, offset = head[end + 4 :], 0
            while data:
                if fault.stall_after is not None and offset >= fault.stall_after:
                    self._stopping.wait()
                    return
                if fault.cut_after is not None and offset >= fault.cut_after:
                    return
                limit = len(data)
                for bound in (fault.stall_after, fault.cut_after):
                    if bound is not None:
                        limit = min(limit, bound - offset)
                if fault.rate is not None:
                    limit = min(limit, max(1, int(fault.rate / 20)))
                piece, data = bytearray(data[:limit]), data[limit:]
                if fault.flip is not None and offset <= fault.flip < offset + len(piece):
                    piece[fault.flip - offset] ^= 0xFF
                client.sendall(piece)
                offset += len(piece)
                if fault.rate is not None:
                    time.sleep(len(piece) / fault.rate)


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    """The request head (up to its blank line) and any bytes read past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(_CHUNK)
        if not chunk or len(data) > MAX_HEAD:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _close_after(head: bytes) -> bytes:
    """The request head with ``Connection: close`` in place of any connection options."""
    lines = [line for line in head.split(b"\r\n") if not _CONNECTION_HEADER.match(line)]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until end of file, then half-close ``sink``."""
    try:
        while data := source.recv(_CHUNK):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
