"""Ranged fills: part planning, the contiguous prefix, and what readers see of it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from dockmirror.cache.fill import HIGH_WATER, WRITE_DELAY
from dockmirror.cache.follow import POLL_INTERVAL, FollowedFill
from dockmirror.cache.parts import (
    ALIGN,
    MIN_RANGE,
    PREFIX_SUFFIX,
    RANGED_SUFFIX,
    RANGES_PER_PART,
    PartBody,
    RangedFill,
    Spans,
    plan,
    read_prefix,
)
from dockmirror.cache.reader import CHUNK
from dockmirror.ranged import RANGES_RECHECK, RangeSupport, content_range, range_header
from dockmirror.streaming import BODY_READ, DigestMismatch, StreamError

from ._cache_support import FakeResponse, HeldRunner, make_store, sha256
from .test_cache_fill import follow, upstream_socket
from .test_coordination import Claims

SIZE = 4 * MIN_RANGE + 12_345
DATA = os.urandom(SIZE)
DIGEST = sha256(DATA)
#: A blob of two ranges.
PAIR = os.urandom(2 * MIN_RANGE)
PAIR_DIGEST = sha256(PAIR)


# --- planning -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, MIN_RANGE, MIN_RANGE + 1, SIZE, 200 << 20, 5 << 30])
@pytest.mark.parametrize("parts", [1, 2, 4, 7, 16])
def test_a_plan_covers_the_blob_in_aligned_ranges_in_order(size, parts):
    ranges = plan(size, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(start % ALIGN == 0 and end > start for start, end in ranges)
    if parts == 1 or size <= MIN_RANGE:
        assert ranges == [(0, size)]
        return
    lengths = {end - start for start, end in ranges[:-1]}
    assert len(lengths) == 1 and min(lengths) >= MIN_RANGE
    assert len(ranges) <= max(parts * RANGES_PER_PART, -(-size // MIN_RANGE))


def test_spans_track_the_prefix_and_what_is_missing():
    spans = Spans()
    assert spans.prefix == 0 and spans.missing(0, 10) == [(0, 10)]
    spans.add(20, 30)
    spans.add(40, 50)
    assert spans.prefix == 0
    assert spans.missing(0, 60) == [(0, 20), (30, 40), (50, 60)]
    assert spans.missing(22, 28) == []
    assert spans.missing(25, 45) == [(30, 40)]
    spans.add(0, 20)
    assert spans.prefix == 30 and len(spans) == 2
    spans.add(30, 40)
    assert spans.prefix == 50 and len(spans) == 1


def test_spans_agree_with_a_set_of_bytes():
    rng = random.Random(15)
    for _ in range(200):
        spans, model = Spans(), set()
        for _ in range(rng.randrange(1, 12)):
            start = rng.randrange(0, 100)
            end = start + rng.randrange(0, 30)
            query = (rng.randrange(0, 100), rng.randrange(0, 130))
            gaps = spans.missing(*query)
            assert {i for a, b in gaps for i in range(a, b)} == set(range(*query)) - model
            spans.add(start, end)
            model |= set(range(start, end))
            prefix = 0
            while prefix in model:
                prefix += 1
            assert spans.prefix == prefix


def test_content_range_is_strict():
    def response(*values: str):
        class R:
            headers = Headers({"Content-Range": list(values)} if values else {})

        return R()

    assert content_range(response("bytes 0-99/1000")) == (0, 100, 1000)
    assert content_range(response("bytes 900-999/1000")) == (900, 1000, 1000)
    for bad in ("bytes 0-99/*", "bytes 5-4/10", "bytes 0-10/10", "items 0-1/2", "bytes -1-5/9"):
        assert content_range(response(bad)) is None
    assert content_range(response()) is None
    assert content_range(response("bytes 0-1/9", "bytes 0-1/9")) is None
    assert range_header(5) == "bytes=5-" and range_header(5, 10) == "bytes=5-9"


def test_an_upstream_ignoring_range_is_remembered_for_a_while():
    clock = MemoryReactorClock()
    support = RangeSupport(clock)
    assert support.splits("hub")
    support.refused("hub")
    assert not support.splits("hub") and support.splits("other")
    clock.advance(RANGES_RECHECK)
    assert support.splits("hub")


# --- the fill ------------------------------------------------------------------------


def ranged_fill(store, parts=4, data=DATA, digest=DIGEST):
    fill = store.begin_fill(digest, len(data), "up", parts)
    assert isinstance(fill, RangedFill)
    assert fill.temp_path.endswith(RANGED_SUFFIX) and fill.plan == plan(len(data), parts)
    Deferred.fromCoroutine(fill.open())
    assert fill.ready.fired
    return fill


def body(fill, index, offset=None, end=None):
    """A part body of *fill*'s plan, fed by hand."""
    start, stop = fill.plan[index]
    response = FakeResponse(stop - start)
    part = PartBody(
        fill,
        start if offset is None else offset,
        start,
        stop if end is None else end,
        None,
        fill.store.reactor,
        30,
    )
    response.deliverBody(part)
    return response, part


def test_parts_written_ahead_wait_on_disk_and_readers_see_only_the_prefix(tmp_path):
    store = make_store(tmp_path)
    fill = ranged_fill(store)
    (a, b), (c, d) = fill.plan[0], fill.plan[1]
    first, _ = body(fill, 0)
    second, _ = body(fill, 1)
    _, client, done = follow(store, DIGEST, 0, SIZE)
    second.send(DATA[c:d])  # all of part 1, before any of part 0
    assert (fill.written, fill.received) == (0, 0)
    assert client.value() == b""
    assert os.path.getsize(fill.temp_path) == d  # on disk, not in memory
    assert read_prefix(fill.prefix_path) in (None, 0)
    first.send(DATA[a : a + 1000])
    store.reactor.advance(WRITE_DELAY)
    assert fill.written == 1000 and read_prefix(fill.prefix_path) == 1000
    first.send(DATA[a + 1000 : b])
    store.reactor.advance(0)
    assert fill.written == d  # the prefix jumped over part 1
    assert read_prefix(fill.prefix_path) == d
    assert client.value() == DATA[:d]
    for index in reversed(range(2, len(fill.plan))):
        response, _ = body(fill, index)
        start, stop = fill.plan[index]
        response.send(DATA[start:stop])
        if index > 2:
            assert fill.written == d
    store.reactor.advance(0)
    # Verified and committed, so the last byte went; nothing left behind.
    assert fill.committed and done.result == SIZE and client.value() == DATA
    assert Path(store.path(DIGEST)).read_bytes() == DATA
    assert not os.listdir(store.temp_dir)


def test_parts_written_ahead_count_for_the_reservation(tmp_path):
    store = make_store(tmp_path, max_size=32 << 20)
    fill = ranged_fill(store)
    step = store.reserve_step
    assert fill.reserved == store.reserved == step < MIN_RANGE
    (a, b), (c, d) = fill.plan[0], fill.plan[1]
    second, _ = body(fill, 1)
    second.send(DATA[c:d])
    again, _ = body(fill, 1)
    again.send(DATA[c:d])  # bytes delivered twice take no more room
    assert fill.written == 0 and fill.taken == d - c
    assert fill.reserved == store.reserved == d - c + step
    first, _ = body(fill, 0)
    first.send(DATA[a:b])
    for index in range(2, len(fill.plan)):
        response, _ = body(fill, index)
        start, stop = fill.plan[index]
        response.send(DATA[start:stop])
    store.reactor.advance(0)
    assert fill.committed and fill.reserved == SIZE
    assert store.reserved == 0 and store.size == SIZE


def test_bytes_delivered_twice_are_written_once(tmp_path):
    """A retry or a fallback stream repeating bytes cannot change what was hashed."""
    store = make_store(tmp_path)
    fill = ranged_fill(store, 2, PAIR, PAIR_DIGEST)
    (a, b), (c, d) = fill.plan
    first, _ = body(fill, 0)
    first.send(PAIR[a:b])
    # A whole-body stream from byte 0, with other bytes where part 0 already was.
    stream, part = body(fill, 0, offset=0, end=d)
    stream.send(os.urandom(b) + PAIR[c:d])
    assert part.done.called and fill.committed
    assert Path(store.path(PAIR_DIGEST)).read_bytes() == PAIR


def test_a_whole_body_skips_what_is_not_asked_and_is_cut_at_the_end(tmp_path):
    store = make_store(tmp_path)
    fill = ranged_fill(store, 2, PAIR, PAIR_DIGEST)
    (_, b), (c, d) = fill.plan
    first, _ = body(fill, 0)
    first.send(PAIR[:b])
    response = FakeResponse(len(PAIR))
    part = PartBody(fill, 0, c, d, len(PAIR), store.reactor, 30)
    response.deliverBody(part)
    response.send(PAIR[: c + 10])
    store.reactor.advance(WRITE_DELAY)
    assert fill.written == c + 10 and not response.transport.stopped
    response.send(PAIR[c + 10 :])
    assert part.done.called and fill.committed


def test_bodies_are_paused_while_the_disk_is_behind(tmp_path):
    runner = HeldRunner()
    store = make_store(tmp_path, run=runner)
    fill = store.begin_fill(sha256(b"large"), 4 * HIGH_WATER, "up", 2)
    Deferred.fromCoroutine(fill.open())
    runner.run_all()
    first, _ = body(fill, 0)
    second, _ = body(fill, 1)
    half = HIGH_WATER // 2
    assert fill.plan[0][1] == fill.plan[1][1] - fill.plan[1][0] == half
    second.send(os.urandom(half))
    assert not second.transport.paused
    first.send(os.urandom(half))
    assert first.transport.paused and second.transport.paused
    late, _ = body(fill, 0)  # a body that starts meanwhile starts paused
    assert late.transport.paused
    runner.run_all()
    assert not first.transport.paused and not second.transport.paused


def test_a_wrong_part_fails_the_fill_and_caches_nothing(tmp_path):
    store = make_store(tmp_path)
    fill = ranged_fill(store, 2, PAIR, PAIR_DIGEST)
    _, client, done = follow(store, PAIR_DIGEST, 0, len(PAIR))
    (a, b), (c, d) = fill.plan
    first, _ = body(fill, 0)
    second, _ = body(fill, 1)
    wrong = bytearray(PAIR[c:d])
    wrong[10] ^= 0xFF
    second.send(bytes(wrong))
    first.send(PAIR[a:b])
    store.reactor.advance(0)
    assert isinstance(fill.error, DigestMismatch)
    assert len(client.value()) < len(PAIR) and isinstance(done.result.value, StreamError)
    done.addErrback(lambda _: None)
    assert not store.has(PAIR_DIGEST) and not os.listdir(store.temp_dir)


def test_a_failed_fill_stops_its_bodies(tmp_path):
    store = make_store(tmp_path)
    fill = ranged_fill(store, 2, PAIR, PAIR_DIGEST)
    first, part = body(fill, 0)
    second, _ = body(fill, 1)
    fill.abandon(StreamError("the mirror is stopping"))
    assert first.transport.stopped and second.transport.stopped
    first.end(Failure(StreamError("aborted")))
    assert isinstance(part.done.result.value, StreamError)
    part.done.addErrback(lambda _: None)
    assert not os.listdir(store.temp_dir)


def test_a_body_cut_short_fails_with_where_it_stopped(tmp_path):
    store = make_store(tmp_path)
    fill = ranged_fill(store, 2, PAIR, PAIR_DIGEST)
    first, part = body(fill, 0)
    first.send(PAIR[:5000])
    store.reactor.advance(WRITE_DELAY)
    first.end()
    assert part.pos == 5000
    failure = part.done.result
    part.done.addErrback(lambda _: None)
    assert "ended at byte 5000" in str(failure.value)
    assert fill.written == 5000 and not fill.done


def test_another_process_follows_a_ranged_fill_by_its_prefix_file(tmp_path):
    clock, claims = MemoryReactorClock(), Claims()
    claims.elsewhere.add(DIGEST)
    temp = tmp_path / "tmp" / f"{DIGEST.partition(':')[2]}.1{RANGED_SUFFIX}"
    temp.parent.mkdir()
    prefix = Path(str(temp) + PREFIX_SUFFIX)
    fill = FollowedFill(
        DIGEST,
        SIZE,
        str(tmp_path / "final"),
        lambda: str(temp) if temp.exists() else None,
        claims,
        clock,
        lambda _: None,
        idle_timeout=30,
    )
    fill.start()
    with open(temp, "wb") as f:  # a part written ahead, with a hole before it
        f.seek(3 * ALIGN)
        f.write(DATA[3 * ALIGN :])
    clock.advance(POLL_INTERVAL)
    assert fill.ready.fired and fill.written == 0  # no prefix file yet: nothing
    prefix.write_bytes((1000).to_bytes(8, "little"))
    clock.advance(POLL_INTERVAL)
    assert fill.written == 1000
    prefix.unlink()  # the fill ended: its temporary file says nothing any more
    clock.advance(POLL_INTERVAL)
    assert fill.written == 1000
    fill.abandon(StreamError("done"))


def test_a_longer_body_goes_on_with_the_next_range_while_it_is_its_to_take(tmp_path):
    store = make_store(tmp_path)
    fill = ranged_fill(store)
    ranges = list(fill.plan[1:])
    taken: list[int] = []

    def extend(end):
        if ranges and ranges[0][0] == end and len(taken) < 2:
            taken.append(end)
            return ranges.pop(0)[1]
        return None

    response = FakeResponse(SIZE)
    part = PartBody(fill, 0, 0, fill.plan[0][1], SIZE, store.reactor, 30, extend)
    response.deliverBody(part)
    # One chunk across two boundaries: both ranges are taken, in one go.
    response.send(DATA[: fill.plan[2][0] + 10])
    assert taken == [fill.plan[1][0], fill.plan[2][0]] and not part.done.called
    response.send(DATA[fill.plan[2][0] + 10 : fill.plan[3][0] + 5])
    # The next range is not its to take: the body ends there, and is cut.
    assert part.done.called and response.transport.stopped
    assert part.end == fill.plan[2][1] and fill.delivered == fill.plan[2][1]


def test_bytes_in_order_at_the_front_reach_readers_before_the_disk(tmp_path):
    runner = HeldRunner()
    store = make_store(tmp_path, run=runner)
    fill = store.begin_fill(DIGEST, SIZE, "up", 4)
    Deferred.fromCoroutine(fill.open())
    runner.run_all()
    (a, b), (c, _) = fill.plan[0], fill.plan[1]
    first, _ = body(fill, 0)
    second, _ = body(fill, 1)
    _, client, _ = follow(store, DIGEST, 0, SIZE)
    second.send(DATA[c : c + CHUNK])  # ahead: on its way to the disk only
    first.send(DATA[a : a + 2 * CHUNK])
    store.reactor.advance(0)
    assert fill.written == 0 and fill.received == 2 * CHUNK
    assert client.value() == DATA[: 2 * CHUNK]
    runner.run_all()
    assert fill.written == 0  # too little for a batch ...
    store.reactor.advance(WRITE_DELAY)
    runner.run_all()
    assert fill.written == 2 * CHUNK  # ... until the delay is over
    first.send(DATA[a + 2 * CHUNK : b])  # the prefix meets what came ahead ...
    runner.run_all()
    store.reactor.advance(0)
    assert fill.written == fill.received == c + CHUNK  # ... which is read from the disk
    assert client.value() == DATA[: c + CHUNK]


def test_a_part_reads_its_upstream_socket_in_large_pieces(tmp_path):
    store = make_store(tmp_path)
    fill = ranged_fill(store, parts=2)
    start, stop = fill.plan[0]
    response = FakeResponse(stop - start)
    socket, response.transport = upstream_socket(wrapped=False)
    part = PartBody(fill, start, start, stop, stop - start, store.reactor, 30)
    response.deliverBody(part)
    assert socket.bufferSize == BODY_READ
    response.send(DATA[start:stop])
    assert part.done.called
