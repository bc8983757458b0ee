"""Whole cached blobs go straight from the file to the socket.

On plain TCP with ``os.sendfile``; over TLS sealed in large pieces by
:class:`~dockmirror.tls.WholeRecordsTLS` and written by the sender itself.
These run the real reactor with real sockets on loopback: a plain listener
wrapped as the mirror wraps it, a TLS listener, and raw HTTP clients.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.server import Request, Site

from dockmirror import streaming
from dockmirror.cache.blobs import BlobStore
from dockmirror.cache.fill import Fill
from dockmirror.cache.index import Index
from dockmirror.metrics import Metrics
from dockmirror.pull import Reply
from dockmirror.pull.ranges import parse_range
from dockmirror.tls import PlainHTTPFactory, ReloadingContextFactory, TLSFactory, WholeRecordsTLS
from dockmirror.web import AsyncResource, send_reply
from tests.integration.clients import make_server_tls

from ._cache_support import FakeResponse, run_now, sha256

SIZE = 24 << 20


class BlobResource(AsyncResource):
    """Serves one cached blob the way the mirror does, and keeps its readers."""

    def __init__(self, store: BlobStore, digest: str) -> None:
        super().__init__()
        self.store = store
        self.digest = digest
        self.readers: list[Any] = []
        self.sent: list[int] = []  # as the access log reports it
        self.counted = 0

    async def serve(self, request: Request) -> None:
        size = self.store.size_of(self.digest)
        assert size is not None
        span = parse_range(request.getHeader("range"), size)
        start, end = span or (0, size)
        headers = {"Content-Length": str(end - start)}
        if span:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if request.method == b"HEAD":
            await send_reply(request, Reply(206 if span else 200, headers))
            return
        reader = self.store.reader(self.digest, start, end, self._count)
        self.readers.append(reader)
        await send_reply(request, Reply(206 if span else 200, headers, stream=reader))
        self.sent.append(request.sentLength)

    def _count(self, n: int) -> None:
        self.counted += n


class Client(Protocol):
    """Sends one request; keeps the response; can stop reading or hang up after N bytes."""

    def __init__(self, request: bytes, hang_up_after: int | None = None) -> None:
        self.request = request
        self.hang_up_after = hang_up_after
        self.received = bytearray()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        limit = self.hang_up_after
        if limit is not None and len(self.received) >= limit and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
            self.hang_up_after = None

    def connectionLost(self, reason: Failure) -> None:
        self.closed.callback(None)

    def response(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        head, _, body = bytes(self.received).partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        return status, headers, body


def get(method: str = "GET", *headers: str) -> bytes:
    lines = [f"{method} /blob HTTP/1.1", "Host: test", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Server:
    def __init__(self, tmp_path: Path, data: bytes) -> None:
        index = Index(str(tmp_path / "index.sqlite"), MemoryReactorClock(), run_now)
        self.store = BlobStore(str(tmp_path), None, index, reactor, run_now, Metrics())
        self.store.recover(index.load())
        self.data = data
        self.digest = sha256(data)
        self.resource = BlobResource(self.store, self.digest)
        self.site = Site(self.resource)
        self.tls = make_server_tls(tmp_path, "localhost")
        self.ports: list[Any] = []

    def listen_plain(self) -> int:
        port = reactor.listenTCP(0, PlainHTTPFactory(self.site), interface="127.0.0.1")
        self.ports.append(port)
        return int(port.getHost().port)

    def listen_tls(self) -> int:
        factory = ReloadingContextFactory(str(self.tls.key), str(self.tls.certificate))
        port = reactor.listenTCP(0, TLSFactory(factory, self.site), interface="127.0.0.1")
        self.ports.append(port)
        return int(port.getHost().port)

    def listen(self, kind: str) -> int:
        return self.listen_tls() if kind == "tls" else self.listen_plain()

    async def fetch(self, port: int, client: Client, tls: bool = False) -> Client:
        if tls:
            endpoint: Any = SSL4ClientEndpoint(
                reactor, "127.0.0.1", port, ssl.CertificateOptions(verify=False)
            )
        else:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await connectProtocol(endpoint, client)
        await client.closed
        return client

    async def stop(self) -> None:
        for port in self.ports:
            await port.stopListening()


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    data = os.urandom(SIZE)
    server = Server(tmp_path, data)
    assert await server.store.put_small(server.digest, data)
    yield server
    await server.stop()


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts ``os.sendfile`` sent, as the sender called it."""
    calls: list[int] = []
    real: Callable[[int, int, int, int], int] = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        sent = real(out_fd, in_fd, offset, count)
        calls.append(sent)
        return sent

    monkeypatch.setattr(streaming.os, "sendfile", spy)
    return calls


@pytest.fixture
def sealed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The plaintext byte counts that TLS connections sealed for a file sender."""
    calls: list[int] = []
    real = WholeRecordsTLS.seal

    def spy(self: WholeRecordsTLS, data: memoryview) -> None:
        real(self, data)
        calls.append(len(data))

    monkeypatch.setattr(WholeRecordsTLS, "seal", spy)
    return calls


@pytest.fixture(params=["plain", "tls"])
def kind(request: pytest.FixtureRequest) -> str:
    """The listener: plain TCP (``sendfile``) or TLS (sealed by the sender)."""
    return str(request.param)


@pytest.fixture
def direct_sends(kind: str, sendfile_calls: list[int], sealed: list[int]) -> list[int]:
    """The byte counts sent straight from the file, on the listener of *kind*."""
    return sealed if kind == "tls" else sendfile_calls


@pytest_twisted.async_yield_fixture
async def filling(tmp_path: Path) -> AsyncIterator[tuple[Server, Fill, FakeResponse]]:
    """A server whose blob is being filled: the test feeds the upstream body."""
    server = Server(tmp_path, os.urandom(SIZE))
    fill = server.store.begin_fill(server.digest, SIZE, "up")
    assert isinstance(fill, Fill)
    response = FakeResponse(SIZE)
    await Deferred.fromCoroutine(fill.start(response))
    yield server, fill, response
    await server.stop()


@pytest.fixture
def through_requests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts written through Twisted's ``Request.write``."""
    calls: list[int] = []
    real = Request.write

    def spy(self: Request, data: bytes) -> None:
        calls.append(len(data))
        real(self, data)

    monkeypatch.setattr(Request, "write", spy)
    return calls


async def feed(response: FakeResponse, data: bytes, piece: int = 64 << 10) -> None:
    """Send *data* as the upstream would, a piece per reactor turn."""
    for offset in range(0, len(data), piece):
        response.send(data[offset : offset + piece])
        await pause(0)


def body_bytes(client: Client) -> int:
    return len(client.received.partition(b"\r\n\r\n")[2])


def pause(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await pause(0.01)
    raise AssertionError("not within 10 s")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.ensureDeferred
async def test_a_whole_blob_goes_straight_from_the_file(server, kind, direct_sends):
    port = server.listen(kind)
    fds = open_fds()
    client = await server.fetch(port, Client(get()), tls=kind == "tls")
    status, headers, body = client.response()
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-length"] == str(SIZE).encode()
    assert body == server.data
    assert sum(direct_sends) == SIZE
    if kind == "tls":
        assert len(direct_sends) == SIZE // streaming.SEAL_CHUNK  # in large pieces
    assert server.resource.counted == SIZE
    assert server.resource.sent == [SIZE]
    assert server.store.stats()["readers"] == 0
    await until(lambda: open_fds() == fds)  # a TLS connection closes after its client


@pytest_twisted.ensureDeferred
async def test_the_connection_carries_on_after_a_direct_send(server, kind, direct_sends):
    port = server.listen(kind)
    keep_alive = get().replace(b"Connection: close", b"Connection: keep-alive")
    requests = keep_alive + get("GET", "Range: bytes=0-9")
    client = await server.fetch(port, Client(requests), tls=kind == "tls")
    first, _, rest = client.received.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert rest[:SIZE] == server.data
    second = Client(b"")
    second.received = rest[SIZE:]
    status, _, body = second.response()
    assert status == b"HTTP/1.1 206 Partial Content"
    assert body == server.data[:10]
    assert sum(direct_sends) == SIZE


@pytest_twisted.ensureDeferred
async def test_head_sends_no_body(server, kind, direct_sends):
    port = server.listen(kind)
    client = await server.fetch(port, Client(get("HEAD")), tls=kind == "tls")
    status, headers, body = client.response()
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-length"] == str(SIZE).encode()
    assert body == b""
    assert direct_sends == []


@pytest_twisted.ensureDeferred
async def test_a_range_is_sent_the_ordinary_way(server, kind, direct_sends):
    port = server.listen(kind)
    request = get("GET", "Range: bytes=1000-2000999")
    client = await server.fetch(port, Client(request), tls=kind == "tls")
    status, headers, body = client.response()
    assert status == b"HTTP/1.1 206 Partial Content"
    assert body == server.data[1000:2001000]
    assert direct_sends == []


@pytest_twisted.ensureDeferred
async def test_a_tls_listener_never_uses_sendfile(server, sendfile_calls):
    port = server.listen_tls()
    client = await server.fetch(port, Client(get()), tls=True)
    status, _, body = client.response()
    assert status == b"HTTP/1.1 200 OK"
    assert body == server.data
    assert sendfile_calls == []


@pytest_twisted.ensureDeferred
async def test_a_client_hanging_up_mid_send_frees_everything(server, kind, direct_sends):
    port = server.listen(kind)
    fds = open_fds()
    client = await server.fetch(port, Client(get(), hang_up_after=1 << 20), tls=kind == "tls")
    (reader,) = server.resource.readers
    await until(lambda: reader.done.called)  # at the server's next read or write
    assert 0 < sum(direct_sends) < SIZE
    assert len(client.received) < SIZE
    assert server.store.stats()["readers"] == 0
    assert open_fds() == fds


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_stops_the_file_reads(server, kind, direct_sends):
    port = server.listen(kind)
    client = Client(get())
    fetched = Deferred.fromCoroutine(server.fetch(port, client, tls=kind == "tls"))
    await until(lambda: bool(direct_sends))
    client.transport.pauseProducing()  # type: ignore[union-attr]
    await pause(0.3)
    stalled = sum(direct_sends)
    await pause(0.3)
    assert sum(direct_sends) == stalled < SIZE  # only the socket buffers' worth
    client.transport.resumeProducing()  # type: ignore[union-attr]
    await fetched
    assert client.response()[2] == server.data


@pytest_twisted.ensureDeferred
async def test_a_file_shorter_than_recorded_cuts_the_response_and_is_forgotten(
    server, kind, direct_sends
):
    os.truncate(server.store.path(server.digest), SIZE // 2)
    port = server.listen(kind)
    client = await server.fetch(port, Client(get()), tls=kind == "tls")
    _, headers, body = client.response()
    assert headers[b"content-length"] == str(SIZE).encode()
    assert len(body) == SIZE // 2  # cut short: the client sees a truncated response
    assert not server.store.has(server.digest)


class SocketTransport:
    """Stands for the TCP connection: one end of a socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()


class Consumer:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def test_the_file_waits_until_twisted_has_sent_the_headers(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 1000)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    fd = os.open(path, os.O_RDONLY)
    fake = MemoryReactorClock()
    transport = SocketTransport(ours)
    fake.addWriter(transport)  # the headers are in Twisted's buffer
    sender = streaming.FileSender(fake, transport, fd, 0, 1000, lambda n: None)  # type: ignore[arg-type]
    consumer = Consumer()
    done = sender.write_to(consumer)
    assert consumer.writes == [b""]  # the headers
    assert sender in fake.getWriters()
    sender.doWrite()
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(10)
    fake.removeWriter(transport)  # Twisted sent them
    sender.doWrite()
    assert theirs.recv(2000) == b"x" * 1000
    assert done.result == 1000
    assert sender not in fake.getWriters()
    assert consumer.producer is None
    os.close(fd)
    ours.close()
    theirs.close()


class GrowingFile:
    """A file being written: its bytes in the file, and how far a sender may go."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.in_file = 0
        self.limit = 0

    def extent(self) -> tuple[int, int]:
        return self.in_file, self.limit

    def queued(self, offset: int, limit: int) -> bytes:
        assert self.in_file <= offset <= limit <= self.limit
        return self.data[offset:limit]


class PassThrough:
    """A sealer whose records are the plaintext."""

    sealing = True

    def __init__(self) -> None:
        self.sink: Callable[[bytes], object] | None = None

    def divert(self, sink: Callable[[bytes], object] | None) -> None:
        self.sink = sink

    def seal(self, data: memoryview) -> None:
        assert self.sink is not None
        self.sink(bytes(data))


def test_a_growing_file_is_sent_as_far_as_it_allows(tmp_path):
    size = 3 * streaming.SEAL_CHUNK
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)  # all there; the sender must not read past what it is allowed
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    fd = os.open(path, os.O_RDONLY)
    fake = MemoryReactorClock()
    growing = GrowingFile(data)
    sender = streaming.FileSender(
        fake,
        SocketTransport(ours),  # type: ignore[arg-type]
        fd,
        0,
        size,
        lambda n: None,
        PassThrough(),
        growing,
    )
    done = sender.write_to(Consumer())
    assert sender not in fake.getWriters()  # nothing to send yet

    def received() -> bytes:
        got = b""
        while True:
            try:
                piece = theirs.recv(1 << 20)
            except BlockingIOError:
                return got
            got += piece

    def turn() -> bytes:
        got = b""
        while sender in fake.getWriters():
            sender.doWrite()
            got += received()
        return got

    growing.in_file, growing.limit = 1000, 1000 + streaming.SEAL_CHUNK - 1
    sender.grown()
    assert turn() == data[:1000]  # what is in memory waits for a whole chunk
    growing.limit += 1
    sender.grown()
    assert turn() == data[1000 : 1000 + streaming.SEAL_CHUNK]  # from memory
    growing.in_file, growing.limit = size - 1, size - 1
    sender.grown()
    assert turn() == data[1000 + streaming.SEAL_CHUNK : size - 1]  # the last byte held back
    assert not done.called
    growing.in_file = growing.limit = size
    sender.grown()
    assert turn() == data[size - 1 :]
    assert done.result == size
    os.close(fd)
    ours.close()
    theirs.close()


@pytest_twisted.ensureDeferred
async def test_a_blob_being_filled_goes_straight_to_a_tls_client(filling, sealed, through_requests):
    server, fill, response = filling
    port = server.listen_tls()
    client = Client(get())
    fetched = Deferred.fromCoroutine(server.fetch(port, client, tls=True))
    await until(lambda: bool(server.resource.readers))
    await feed(response, server.data)
    await until(lambda: body_bytes(client) == SIZE - 1)
    await pause(0.1)
    assert body_bytes(client) == SIZE - 1  # the last byte waits for the digest
    response.end()
    await fetched
    status, _, body = client.response()
    assert status == b"HTTP/1.1 200 OK"
    assert body == server.data
    assert sum(through_requests) == 0  # only the headers went through Twisted's request
    assert sum(sealed) == SIZE
    assert len(sealed) <= 2 * SIZE // streaming.SEAL_CHUNK  # in large pieces
    assert server.resource.counted == SIZE
    assert server.resource.sent == [SIZE]
    assert fill.committed and server.store.stats()["readers"] == 0


@pytest_twisted.ensureDeferred
async def test_a_fill_that_fails_cuts_its_client_short(filling, kind, through_requests):
    server, fill, response = filling
    port = server.listen(kind)
    client = Client(get())
    fetched = Deferred.fromCoroutine(server.fetch(port, client, tls=kind == "tls"))
    await until(lambda: bool(server.resource.readers))
    wrong = server.data[:-1] + bytes([server.data[-1] ^ 1])
    await feed(response, wrong)
    response.end()
    await fetched
    _, headers, body = client.response()
    assert headers[b"content-length"] == str(SIZE).encode()
    assert len(body) < SIZE  # never the whole of a body that does not match
    assert body == server.data[: len(body)]
    assert fill.error is not None and server.store.stats()["readers"] == 0


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_does_not_hold_the_fill(filling, kind):
    server, fill, response = filling
    port = server.listen(kind)
    client = Client(get())
    fetched = Deferred.fromCoroutine(server.fetch(port, client, tls=kind == "tls"))
    await until(lambda: bool(server.resource.readers))
    await until(lambda: client.transport is not None)
    client.transport.pauseProducing()  # type: ignore[union-attr]
    await feed(response, server.data)
    response.end()
    await until(lambda: fill.committed)  # the fill went on without the client
    assert body_bytes(client) < SIZE
    client.transport.resumeProducing()  # type: ignore[union-attr]
    await fetched
    assert client.response()[2] == server.data


@pytest_twisted.ensureDeferred
async def test_a_blob_being_filled_goes_through_twisted_on_plain_tcp(
    filling, sendfile_calls, through_requests
):
    server, fill, response = filling
    port = server.listen_plain()
    client = Client(get())
    fetched = Deferred.fromCoroutine(server.fetch(port, client))
    await until(lambda: bool(server.resource.readers))
    await feed(response, server.data)
    response.end()
    await fetched
    assert client.response()[2] == server.data
    assert sum(through_requests) == SIZE and sendfile_calls == []
