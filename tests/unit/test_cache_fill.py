"""Fills: one upstream body into a temporary file, followed by every reader."""

from __future__ import annotations

import os

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web._newclient import TransportProxyProducer

from dockmirror.cache.fill import HIGH_WATER, WRITE_BATCH, WRITE_DELAY, Fill
from dockmirror.cache.reader import CHUNK
from dockmirror.streaming import BODY_READ, IDLE_TIMEOUT, DigestMismatch, StreamError

from ._cache_support import FakeResponse, HeldRunner, make_store, sha256

DATA = os.urandom(300_000)
DIGEST = sha256(DATA)


def started(store, data=DATA, digest=DIGEST, size=None):
    fill = store.begin_fill(digest, len(data) if size is None else size, "up")
    assert isinstance(fill, Fill)
    response = FakeResponse(fill.size)
    Deferred.fromCoroutine(fill.start(response))
    return fill, response


def follow(store, digest=DIGEST, start=0, end=len(DATA)):
    reader = store.reader(digest, start, end, lambda n: None)
    client = StringTransport()
    done = reader.write_to(client)
    return reader, client, done


def failure_of(d: Deferred) -> Failure:
    failures = []
    d.addErrback(failures.append)
    assert failures, "the Deferred did not fail"
    return failures[0]


def test_readers_follow_the_file_and_get_the_last_byte_only_once_verified(tmp_path):
    store = make_store(tmp_path)
    fill, response = started(store)
    assert fill.ready.fired
    _, early, early_done = follow(store)
    response.send(DATA[:100_000])
    assert early.value() == DATA[:CHUNK]  # whole chunks from memory ...
    store.reactor.advance(WRITE_DELAY)
    assert early.value() == DATA[:100_000]  # ... the rest once it is on the disk
    _, late, late_done = follow(store, start=50_000, end=len(DATA))
    response.send(DATA[100_000:])
    store.reactor.advance(0)
    assert early.value() == DATA[:-1]
    assert late.value() == DATA[50_000:-1]
    assert not early_done.called and not late_done.called
    response.end()
    assert early.value() == DATA and late.value() == DATA[50_000:]
    assert early_done.result == len(DATA)
    assert store.has(DIGEST) and store.filling(DIGEST) is None
    with open(store.path(DIGEST), "rb") as f:
        assert f.read() == DATA
    assert os.listdir(store.temp_dir) == []
    assert store.reserved == 0 and store.size == len(DATA)


def test_a_mismatch_commits_nothing_and_cuts_every_reader(tmp_path):
    store = make_store(tmp_path)
    bad = bytearray(DATA)
    bad[1234] ^= 1
    fill, response = started(store)
    _, client, done = follow(store)
    response.send(bytes(bad))
    response.end()
    assert failure_of(done).check(StreamError)
    assert len(client.value()) < len(DATA)
    assert isinstance(fill.error, DigestMismatch)
    assert not store.has(DIGEST) and store.filling(DIGEST) is None
    assert os.listdir(store.temp_dir) == []
    assert store.reserved == 0
    assert store.metrics.digest_mismatches.labels("up")._value.get() == 1


@pytest.mark.parametrize(
    "body, error",
    [
        (DATA + b"x", "more than"),
        (DATA[:-10], "of 300000 bytes"),
    ],
)
def test_a_body_of_the_wrong_length_fails(tmp_path, body, error):
    store = make_store(tmp_path)
    fill, response = started(store)
    response.send(body)
    if not fill.error:
        response.end()
    assert error in str(fill.error)
    assert not store.has(DIGEST)


def test_an_upstream_cut_fails_the_fill(tmp_path):
    store = make_store(tmp_path)
    fill, response = started(store)
    response.send(DATA[:1000])
    response.end(Failure(ConnectionError("reset")))
    assert "upstream body failed" in str(fill.error)
    assert os.listdir(store.temp_dir) == []


def test_an_idle_upstream_fails_the_fill(tmp_path):
    store = make_store(tmp_path)
    fill, response = started(store)
    response.send(DATA[:1000])
    store.reactor.advance(IDLE_TIMEOUT)
    assert "sent nothing" in str(fill.error)
    assert response.transport.stopped


def test_only_a_disk_that_is_behind_pauses_the_upstream(tmp_path):
    disk = HeldRunner()
    clock = MemoryReactorClock()
    data = os.urandom(HIGH_WATER + (1 << 20))
    store = make_store(tmp_path, run=disk, clock=clock)
    fill, response = started(store, data, sha256(data))
    disk.run_all()  # the temporary file is created
    reader, client, _ = follow(store, sha256(data), 0, len(data))
    reader.pauseProducing()  # a slow client
    for offset in range(0, HIGH_WATER, 1 << 20):
        response.send(data[offset : offset + (1 << 20)])
    assert response.transport.paused  # the disk is behind
    disk.run_all()
    assert not response.transport.paused and fill.written == HIGH_WATER
    response.send(data[HIGH_WATER:])
    response.end()
    disk.run_all()
    assert fill.committed and client.value() == b""
    reader.resumeProducing()
    while len(client.value()) < len(data):
        clock.advance(0)
    assert client.value() == data


def test_a_reader_going_away_does_not_stop_the_fill(tmp_path):
    store = make_store(tmp_path)
    fill, response = started(store)
    reader, _, done = follow(store)
    response.send(DATA[:1000])
    reader.stopProducing()
    assert failure_of(done).check(StreamError)
    response.send(DATA[1000:])
    response.end()
    assert fill.committed and store.has(DIGEST)
    assert not response.transport.stopped


def test_abandoned_before_the_body(tmp_path):
    store = make_store(tmp_path)
    fill = store.begin_fill(DIGEST, len(DATA), "up")
    assert isinstance(fill, Fill)
    waiting = fill.ready.wait()
    fill.abandon(StreamError("upstream said 404"))
    assert failure_of(waiting).check(StreamError)
    assert store.filling(DIGEST) is None and store.reserved == 0


def test_a_reader_arriving_during_the_rename_opens_the_final_file(tmp_path):
    store = make_store(tmp_path)
    fill, response = started(store)
    response.send(DATA)
    # The worker thread has renamed the file; the reactor has not heard yet.
    os.makedirs(os.path.dirname(store.path(DIGEST)))
    os.rename(fill.temp_path, store.path(DIGEST))
    _, client, _ = follow(store)
    assert client.value() == DATA[:-1]


def test_readers_finish_once_verified_while_the_file_is_made_durable(tmp_path):
    disk = HeldRunner()
    store = make_store(tmp_path, run=disk)
    fill, response = started(store)
    disk.run_all()  # the temporary file is created
    _, client, done = follow(store)
    response.send(DATA)
    response.end()
    disk.run_queued()  # written and hashed; fsync and rename are queued
    assert fill.verified and not fill.committed
    assert client.value() == DATA and done.called
    disk.run_queued()
    assert fill.committed and store.has(DIGEST)


def test_stopping_lets_a_fill_finish_within_the_grace_period(tmp_path):
    store = make_store(tmp_path)
    fill, response = started(store)
    response.send(DATA[:1000])
    stopped = Deferred.fromCoroutine(store.stop(30))
    assert not stopped.called
    response.send(DATA[1000:])
    response.end()
    store.reactor.advance(0)
    assert stopped.called
    assert store.has(DIGEST)


def test_stopping_abandons_a_fill_after_the_grace_period(tmp_path):
    store = make_store(tmp_path)
    fill, response = started(store)
    response.send(DATA[:1000])
    stopped = Deferred.fromCoroutine(store.stop(30))
    store.reactor.advance(31)
    assert stopped.called
    assert isinstance(fill.error, StreamError)
    assert not store.has(DIGEST) and store.filling(DIGEST) is None


def test_a_write_failing_after_the_fill_failed_still_closes_the_file(tmp_path):
    disk = HeldRunner()
    store = make_store(tmp_path, run=disk)
    fill, response = started(store)
    disk.run_all()
    response.send(DATA[:1000])
    store.reactor.advance(WRITE_DELAY)  # the batch goes to the disk
    response.end(Failure(ConnectionLost("upstream went away")))
    assert fill.error is not None
    [(_, _, writing)] = disk.queue
    disk.queue.clear()
    writing.errback(OSError(28, "No space left on device"))
    disk.run_all()
    assert os.listdir(store.temp_dir) == []


def test_readers_take_what_the_disk_has_yet_to_write_from_memory(tmp_path):
    disk = HeldRunner()
    clock = MemoryReactorClock()
    store = make_store(tmp_path, run=disk, clock=clock)
    fill, response = started(store)
    disk.run_all()  # the temporary file is created
    ahead, ahead_client, ahead_done = follow(store)
    behind, behind_client, _ = follow(store, start=10, end=len(DATA))
    behind.pauseProducing()  # a slow client
    response.send(DATA[:100_000])
    response.send(DATA[100_000:200_000])
    assert fill.written == 0  # the disk has written nothing yet
    assert ahead_client.value() == DATA[: 200_000 // CHUNK * CHUNK]  # whole chunks
    clock.advance(WRITE_DELAY)
    disk.run_all()
    assert fill.written == 200_000
    response.send(DATA[200_000:])
    assert ahead_client.value() == DATA[:-1]  # the last byte waits for the digest
    behind.resumeProducing()  # from the file, then from memory
    for _ in range(100):
        clock.advance(0)
    assert behind_client.value() == DATA[10:-1]
    response.end()
    disk.run_all()
    assert ahead_client.value() == DATA and behind_client.value() == DATA[10:]
    assert ahead_done.result == len(DATA)


def test_a_fill_failing_before_its_disk_writes_cuts_the_readers_taking_from_memory(tmp_path):
    disk = HeldRunner()
    store = make_store(tmp_path, run=disk)
    fill, response = started(store)
    disk.run_all()
    _, client, done = follow(store)
    response.send(DATA[:100_000])
    assert client.value() == DATA[:CHUNK]
    response.end(Failure(ConnectionLost()))
    assert isinstance(failure_of(done).value, StreamError)
    disk.run_all()
    assert not store.has(DIGEST) and os.listdir(store.temp_dir) == []


@pytest.mark.parametrize("corrupt", [False, True])
def test_a_range_inside_a_blob_being_filled_ends_only_once_verified(tmp_path, corrupt):
    store = make_store(tmp_path)
    data = bytearray(DATA)
    if corrupt:
        data[10] ^= 1
    fill, response = started(store)
    _, client, done = follow(store, start=0, end=100)
    response.send(bytes(data[:200_000]))
    store.reactor.advance(0)
    # The range's bytes are in the file, but its last byte waits for the digest.
    assert client.value() == bytes(data[:99])
    assert not done.called
    response.send(bytes(data[200_000:]))
    response.end()
    if corrupt:
        assert failure_of(done).check(StreamError)
        assert not store.has(DIGEST)
    else:
        assert done.result == 100 and client.value() == DATA[:100]


# --- resuming a broken body ----------------------------------------------------------


def resumable(store, answers):
    """A fill whose broken bodies are taken up by *answers*: (code, offset) -> response."""
    asked: list[int] = []
    responses: list[FakeResponse] = []

    async def resume(offset: int) -> FakeResponse:
        asked.append(offset)
        code, length = answers.pop(0)
        response = FakeResponse(length(offset))
        response.code = code
        responses.append(response)
        return response

    fill = store.begin_fill(DIGEST, len(DATA), "up")
    assert isinstance(fill, Fill)
    first = FakeResponse(len(DATA))
    Deferred.fromCoroutine(fill.start(first, resume=resume))
    return fill, first, asked, responses


@pytest.mark.parametrize("code", [200, 206])
def test_a_broken_body_is_resumed_and_readers_never_notice(tmp_path, code):
    store = make_store(tmp_path)
    rest = (lambda offset: len(DATA) - offset) if code == 206 else (lambda offset: len(DATA))
    fill, first, asked, responses = resumable(store, [(code, rest)])
    _, client, done = follow(store)
    first.send(DATA[:120_000])
    first.end(Failure(ConnectionLost("the filling node died")))
    assert asked == [120_000] and not fill.done
    [second] = responses
    second.send(DATA if code == 200 else DATA[120_000:])  # a 200 starts over
    second.end()
    store.reactor.advance(0)
    assert done.result == len(DATA) and client.value() == DATA
    assert fill.committed and store.has(DIGEST)


def test_resuming_gives_up_after_a_few_breaks(tmp_path):
    store = make_store(tmp_path)
    rest = lambda offset: len(DATA) - offset  # noqa: E731
    fill, first, asked, responses = resumable(store, [(206, rest)] * 3)
    _, client, done = follow(store)
    first.send(DATA[:1000])
    first.end(Failure(ConnectionLost()))
    for _ in range(3):
        responses[-1].end(Failure(ConnectionLost()))
    assert asked == [1000, 1000, 1000]
    assert failure_of(done).check(StreamError)
    assert isinstance(fill.error, StreamError) and not store.has(DIGEST)
    assert len(client.value()) < len(DATA)


def test_a_resumed_body_that_differs_is_never_committed(tmp_path):
    store = make_store(tmp_path)
    fill, first, _, responses = resumable(store, [(206, lambda offset: len(DATA) - offset)])
    _, client, done = follow(store)
    first.send(DATA[:5000])
    first.end(Failure(ConnectionLost()))
    bad = bytearray(DATA[5000:])
    bad[-10] ^= 1
    responses[0].send(bytes(bad))
    responses[0].end()
    assert failure_of(done).check(StreamError)
    assert isinstance(fill.error, DigestMismatch) and not store.has(DIGEST)
    assert len(client.value()) < len(DATA)


def test_the_disk_gets_a_fast_body_in_batches_and_a_slow_one_within_the_delay(tmp_path):
    disk = HeldRunner()
    clock = MemoryReactorClock()
    data = os.urandom(WRITE_BATCH + 3 * CHUNK)
    store = make_store(tmp_path, run=disk, clock=clock)
    fill, response = started(store, data, sha256(data))
    disk.run_all()  # the temporary file is created
    for offset in range(0, WRITE_BATCH - CHUNK, CHUNK):
        response.send(data[offset : offset + CHUNK])
    assert disk.queue == []  # not one round trip to a thread per chunk ...
    response.send(data[WRITE_BATCH - CHUNK : WRITE_BATCH])
    [(_, (_, chunks, _), _)] = disk.queue  # ... but one per batch
    assert b"".join(chunks) == data[:WRITE_BATCH]
    disk.run_all()
    response.send(data[WRITE_BATCH : WRITE_BATCH + CHUNK])
    clock.advance(WRITE_DELAY / 2)
    assert disk.queue == [] and fill.written == WRITE_BATCH
    clock.advance(WRITE_DELAY / 2)  # a slow upstream's bytes wait no longer
    disk.run_all()
    assert fill.written == WRITE_BATCH + CHUNK
    response.send(data[WRITE_BATCH + CHUNK :])
    response.end()  # the last bytes go at once
    disk.run_all()
    assert fill.committed
    assert [c for c in clock.getDelayedCalls() if "Fill" in repr(c)] == []


def upstream_socket(wrapped: bool) -> tuple[FileDescriptor, TransportProxyProducer]:
    """A socket's transport, as Twisted's HTTP client hands it to a body (through TLS or not)."""
    socket = FileDescriptor(reactor=MemoryReactorClock())  # what TCP transports are
    under: object = socket
    if wrapped:
        under = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        under.makeConnection(socket)
    return socket, TransportProxyProducer(under)


@pytest.mark.parametrize("wrapped", [False, True], ids=["tcp", "tls"])
def test_the_upstream_socket_is_read_in_large_pieces(tmp_path, wrapped):
    store = make_store(tmp_path)
    fill = store.begin_fill(DIGEST, len(DATA), "up")
    assert isinstance(fill, Fill)
    response = FakeResponse(len(DATA))
    socket, response.transport = upstream_socket(wrapped)
    assert socket.bufferSize == 64 << 10
    Deferred.fromCoroutine(fill.start(response))
    assert socket.bufferSize == BODY_READ
    response.send(DATA)
    response.end()
    assert fill.committed
