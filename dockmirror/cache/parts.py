"""A blob filled by several ranged bodies at once, each written at its offsets.

A large blob is fetched over a few connections at once, each asking for
the next of its ranges (:func:`plan`) when done with one; every ranged
response is delivered to a :class:`PartBody`.  The bodies write straight into
the temporary file at their offsets, so out-of-order bytes wait on the disk,
not in memory; every body is paused while the disk is behind.  The file
grows a contiguous prefix from byte 0 (:class:`Spans`): the digest is
computed in order over it, in the worker threads that write, and it alone
is what readers see.  Bytes that arrive right at the end of that prefix
(the connection reading in order at the front) are also kept in memory
until written, so readers get them at once, as from a single stream.  A byte is written once:
a body that repeats what another already delivered (a retry, a fallback
stream) has those bytes dropped, so what was hashed is what is on disk.

Readers in other processes cannot learn the prefix from the file's size,
which counts the parts written ahead: the fill keeps its length in a second
file beside the temporary one, ``<temp>.prefix`` (8 bytes, little-endian),
and its temporary file's name ends with :data:`RANGED_SUFFIX` so that they
know to read it (:mod:`dockmirror.cache.follow`).
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dockmirror.cache import files
from dockmirror.cache.fill import HIGH_WATER, LOW_WATER, Fill
from dockmirror.logs import printable
from dockmirror.streaming import IDLE_TIMEOUT, IdleTimer, StreamError, read_large

log = Logger()

#: A ranged fill's temporary file's name ends so ...
RANGED_SUFFIX = ".ranged"
#: ... and the file of its prefix's length is named as it, with this added.
PREFIX_SUFFIX = ".prefix"
#: Range boundaries fall on multiples of this.
ALIGN = 64 << 10
#: Ranges a blob is cut in, per connection fetching it ...
RANGES_PER_PART = 8
#: ... each of at least this many bytes, so a request's round trip costs little.
MIN_RANGE = 4 << 20
#: The most bytes of the prefix one disk job reads back to hash, so writes are not held up.
HASH_STEP = 16 << 20
#: Bytes read back per read while hashing.
HASH_BLOCK = 1 << 20


def plan(size: int, parts: int) -> list[tuple[int, int]]:
    """The ranges ``[start, end)`` that *parts* connections fetch a blob of *size* bytes in.

    They are in order, cover the blob, start on multiples of :data:`ALIGN`,
    and number about :data:`RANGES_PER_PART` per connection, none under
    :data:`MIN_RANGE` but the last: each connection takes the next range when
    it is done with one, so the contiguous prefix, which readers follow,
    trails the fastest connection by a few ranges only.
    """
    if parts <= 1 or size <= MIN_RANGE:
        return [(0, size)]
    step = max(-(-size // (parts * RANGES_PER_PART)), MIN_RANGE)
    step = -(-step // ALIGN) * ALIGN
    return [(start, min(start + step, size)) for start in range(0, size, step)]


class Spans:
    """The byte ranges of a blob delivered so far, merged, and their prefix from byte 0."""

    def __init__(self) -> None:
        #: Disjoint, sorted, non-adjacent ``[start, end)`` ranges.
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __repr__(self) -> str:
        return f"<Spans {list(zip(self._starts, self._ends, strict=True))}>"

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def prefix(self) -> int:
        """The first byte not delivered: bytes [0, prefix) all are."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not delivered yet, in order."""
        gaps = []
        i = bisect.bisect_right(self._ends, start)
        pos = start
        while pos < end and i < len(self._starts):
            if self._starts[i] >= end:
                break
            if self._starts[i] > pos:
                gaps.append((pos, self._starts[i]))
            pos = max(pos, self._ends[i])
            i += 1
        if pos < end:
            gaps.append((pos, end))
        return gaps

    def add(self, start: int, end: int) -> None:
        """Record ``[start, end)`` as delivered."""
        if start >= end:
            return
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]


class RangedFill(Fill):
    """A fill whose bytes come from several :class:`PartBody` at their offsets.

    :attr:`plan` is the ranges to ask for, over :attr:`parts` connections
    at once; :attr:`written` is the contiguous prefix, hashed and on the
    disk, and :attr:`received` how far bytes that extend it in order are
    held in memory (:meth:`queued`) until they are written.  Made by
    :meth:`BlobStore.begin_fill` with ``parts`` above 1, then
    :meth:`open`-ed, and fed by bodies.
    """

    def __init__(self, *args: Any, parts: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parts = parts
        self.plan = plan(self.size, parts)
        self.prefix_path = self.temp_path + PREFIX_SUFFIX
        self._prefix_fd: int | None = None
        self._spans = Spans()
        self._chunks: list[tuple[int, bytes]] = []
        #: Where the first chunk of :attr:`_queued` starts.
        self._queued_start = 0
        self._bodies: list[PartBody] = []

    def __repr__(self) -> str:
        return super().__repr__().replace("<Fill", "<RangedFill", 1)

    @property
    def delivered(self) -> int:
        """The first byte no body delivered: where a single stream would resume."""
        return self._spans.prefix

    def _create(self) -> int:
        fd = files.create_fill(self.temp_path, readable=True)
        try:
            self._prefix_fd = files.create(self.prefix_path)
        except OSError:
            files.discard(fd, self.temp_path)
            raise
        return fd

    # --- the bodies ------------------------------------------------------------

    def attach(self, body: PartBody) -> None:
        self._bodies.append(body)
        if self._paused:
            body.pause()

    def detach(self, body: PartBody) -> None:
        if body in self._bodies:
            self._bodies.remove(body)

    def write_at(self, offset: int, data: bytes) -> None:
        """Take bytes ``[offset, offset + len(data))`` of the blob, dropping what was delivered."""
        if self.done:
            return
        self._uncounted += len(data)
        end = offset + len(data)
        received = self.received
        for start, stop in self._spans.missing(offset, end):
            if not self._take(stop - start):
                return
            piece = data if (start, stop) == (offset, end) else data[start - offset : stop - offset]
            self._spans.add(start, stop)
            self._chunks.append((start, piece))
            self._pending_bytes += len(piece)
            self._batch_bytes += len(piece)
            if start == self.received:
                self._queued.append(piece)
                self.received = stop
        if self._pending_bytes >= HIGH_WATER and not self._paused:
            self._paused = True
            for body in self._bodies:
                body.pause()
        self._write_next()
        if self.received > received:
            self._notify()

    # --- the disk --------------------------------------------------------------

    def _write_next(self) -> None:
        if self._writing or self._evicting or self.done:
            return
        prefix = self._spans.prefix
        target = min(prefix, self.written + HASH_STEP)
        # Bytes still to hash, with none to write, or the last ones, are not held back.
        now = not self._chunks or prefix == self.size
        if (self._chunks or target > self.written) and self._batch_ready(now):
            chunks, self._chunks = sorted(self._chunks, key=lambda c: c[0]), []
            self._take_batch()
            count = sum(len(data) for _, data in chunks)
            self._writing = True
            assert self._fd is not None
            self._run(
                _write_at, self._fd, self._prefix_fd, chunks, self._hash, self.written, target
            ).addCallbacks(lambda _: self._wrote_at(count, target), self._write_failed)
        elif self.written == self.size:
            self._verify()

    def _wrote_at(self, count: int, target: int) -> None:
        self._writing = False
        if self.error is not None:
            self._close_and_remove()
            return
        self.written = target
        queued = self._queued
        while queued and self._queued_start + len(queued[0]) <= target:
            self._queued_start += len(queued.popleft())
        if self.received < target:  # the prefix went past what came in order
            self.received = self._queued_start = target
            queued.clear()
        self._pending_bytes -= count
        if self._paused and self._pending_bytes <= LOW_WATER:
            self._paused = False
            for body in list(self._bodies):
                body.resume()
        self._notify()
        self._write_next()

    def _committed(self, result: object) -> None:
        self._remove_prefix_file()
        super()._committed(result)

    # --- failure ---------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        if self.done:
            return
        bodies, self._bodies = self._bodies, []
        self._chunks = []
        super()._fail(error)
        for body in bodies:
            body.stop()

    def _close_and_remove(self) -> None:
        super()._close_and_remove()
        self._remove_prefix_file()

    def _remove_prefix_file(self) -> None:
        fd, self._prefix_fd = self._prefix_fd, None
        self._run(files.discard, fd, self.prefix_path).addErrback(
            lambda f: log.failure("removing {path}", f, path=self.prefix_path)
        )


def _write_at(
    fd: int,
    prefix_fd: int | None,
    chunks: list[tuple[int, bytes]],
    hasher: Any,
    hashed: int,
    target: int,
) -> None:
    """Write *chunks* at their offsets, then hash bytes [hashed, target) (in a worker thread).

    A chunk that starts where the hash stands is hashed from memory; the
    rest is read back from the file.  The prefix file gets *target*.
    """
    for offset, data in chunks:
        files.write_all_at(fd, data, offset)
        if offset == hashed < target:
            take = min(len(data), target - hashed)
            hasher.update(data if take == len(data) else data[:take])
            hashed += take
    while hashed < target:
        block = os.pread(fd, min(HASH_BLOCK, target - hashed), hashed)
        if not block:
            raise OSError(errno.EIO, "the file is shorter than written")
        hasher.update(block)
        hashed += len(block)
    if prefix_fd is not None:
        os.pwrite(prefix_fd, target.to_bytes(8, "little"), 0)


def read_prefix(path: str) -> int | None:
    """The prefix length a ranged fill recorded in *path*, or None if there is none (yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, 8, 0)
    finally:
        os.close(fd)
    return int.from_bytes(data, "little") if len(data) == 8 else None


class PartBody(Protocol):
    """One response body, bytes ``[offset, ...)`` of a blob, written into a :class:`RangedFill`.

    Bytes before *start* are skipped (a whole body answering a request for
    a later part).  A body longer than *end* (its *length* is known, or not)
    goes on for as long as *extend*, called with *end*, returns a new end
    (the next range, when it is this body's to take), and is cut there.  :attr:`pos` is the blob
    offset reached.  :attr:`done` fires once ``[start, end)`` arrived, or
    fails with :class:`StreamError`; cancelling it aborts the body.  An
    upstream silent for *idle_timeout* seconds has its body aborted.
    """

    def __init__(
        self,
        fill: RangedFill,
        offset: int,
        start: int,
        end: int,
        length: int | None,
        reactor: IReactorTime,
        idle_timeout: float = IDLE_TIMEOUT,
        extend: Callable[[int], int | None] | None = None,
    ) -> None:
        self.fill = fill
        self._extend = extend
        self.pos = offset
        self._body_end = None if length is None else offset + length
        self.start = start
        self.end = end
        self._timer = IdleTimer(reactor, idle_timeout, self._idle)
        self._why: StreamError | None = None
        self.done: Deferred[None] = Deferred(lambda _: self.stop())

    def __repr__(self) -> str:
        return f"<PartBody {self.start}-{self.end} at {self.pos}>"

    @property
    def _producer(self) -> IPushProducer | None:
        return cast(IPushProducer | None, self.transport)

    def connectionMade(self) -> None:
        read_large(self.transport)
        self._timer.start()
        self.fill.attach(self)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._timer.touch()
        begin, self.pos = self.pos, self.pos + len(data)
        while True:
            lo, hi = max(begin, self.start), min(self.pos, self.end)
            if hi > lo:
                whole = (lo, hi) == (begin, self.pos)
                self.fill.write_at(lo, data if whole else data[lo - begin : hi - begin])
            if self.pos < self.end:
                return
            longer = self._body_end is None or self._body_end > self.end
            end = self._extend(self.end) if longer and self._extend is not None else None
            if end is None:
                self._end(None)
                if longer:
                    self.stop()  # the rest is not needed
                return
            self.start, self.end = self.end, end

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._timer.stop()
        self.fill.detach(self)
        if self._why is not None:
            self._end(self._why)
        elif reason.check(ResponseDone) and self.pos >= self.end:
            self._end(None)
        elif reason.check(ResponseDone):
            self._end(StreamError(f"the body ended at byte {self.pos}, before {self.end}"))
        else:
            why = printable(reason.getErrorMessage())
            self._end(StreamError(f"the body failed at byte {self.pos}: {why}"))

    def pause(self) -> None:
        self._timer.stop()
        if self._producer is not None:
            self._producer.pauseProducing()

    def resume(self) -> None:
        if not self.done.called:
            self._timer.start()
        if self._producer is not None:
            self._producer.resumeProducing()

    def stop(self) -> None:
        self._timer.stop()
        if self._producer is not None:
            self._producer.stopProducing()

    def _idle(self) -> None:
        self._why = StreamError(f"the upstream sent nothing for {self._timer.timeout:.0f}s")
        self.stop()

    def _end(self, error: StreamError | None) -> None:
        self._timer.stop()
        if self.done.called:
            return
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)
