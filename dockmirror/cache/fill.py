"""One upstream blob body written to a temporary file, for every reader at once.

The body is hashed and written by worker threads, one batch at a time, of
:data:`WRITE_BATCH` bytes or what came in :data:`WRITE_DELAY` seconds: each
batch costs the reactor thread a round trip to a thread and back, so a fast
upstream's body is not sent there chunk by chunk.  Readers follow the body
as it arrives: bytes not in the file yet are taken from the queue in memory,
the rest from the file.  The upstream socket is
paused only while the disk is behind (:data:`HIGH_WATER` bytes queued),
never for a slow client, so one client cannot stall the others and no blob
is ever held in memory.  Room in the cache is reserved as the body arrives,
a step ahead of it (:meth:`BlobStore.grow`): bytes past the reservation
wait in memory until the blobs evicted for them are gone.  The file is
renamed to its digest only when the size and digest match.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse

from dockmirror.cache import files
from dockmirror.cache.index import Runner
from dockmirror.cache.progress import FillProgress
from dockmirror.errors import RegistryError
from dockmirror.logs import printable
from dockmirror.streaming import (
    IDLE_TIMEOUT,
    DigestMismatch,
    IdleTimer,
    StreamError,
    read_large,
)
from dockmirror.upstream import discard

if TYPE_CHECKING:
    from dockmirror.cache.blobs import BlobStore

log = Logger()

#: Bytes queued for the disk above which the upstream is paused ...
HIGH_WATER = 8 << 20
#: ... and below which it is resumed.
LOW_WATER = 2 << 20
#: Bytes received that make a batch for the disk at once ...
WRITE_BATCH = 1 << 20
#: ... and seconds after which fewer are sent there anyway (a slow upstream).
WRITE_DELAY = 0.02
#: Times a broken body may be taken up again from where it broke.
RESUMES = 3

#: Gives a new body of the blob, 206 from the offset it is given or 200 from the start.
Resumer = Callable[[int], Awaitable[IResponse]]


class CacheWriteError(StreamError):
    """The cache's disk refused the blob (full, read-only, failing)."""


class Fill(FillProgress, Protocol):
    """A blob on its way from an upstream into the cache.

    Made by :meth:`BlobStore.begin_fill` with room reserved for its first
    :attr:`reserved` bytes, then either
    :meth:`start`-ed with the upstream response or :meth:`abandon`-ed.
    :attr:`ready` fires once the temporary file exists; :attr:`finished` once
    the blob is committed, or fails with the reason it is not.  Readers
    :meth:`subscribe` to hear of every change of :attr:`received`,
    :attr:`written` and :attr:`verified`, which lets them send the last byte
    while the file is being made durable.  Bytes past :attr:`written` and up
    to :attr:`received` are read from memory with :meth:`queued`.
    """

    def __init__(
        self,
        store: BlobStore,
        digest: str,
        size: int,
        upstream: str,
        temp_path: str,
        reserved: int,
        evictions: list[Deferred[None]],
        reactor: IReactorTime,
        run: Runner,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        FillProgress.__init__(self, digest, size, temp_path)
        self.store = store
        self.upstream = upstream
        #: Bytes of room reserved in the cache, grown as :attr:`taken` nears it.
        self.reserved = reserved
        #: Bytes of the body taken in to be written, whatever their offsets.
        self.taken = 0
        self._evictions = evictions
        #: Evictions for the bytes past the first reservation not done yet:
        #: nothing is written meanwhile.
        self._evicting = 0
        self._run = run
        self.received = 0
        self._fd: int | None = None
        self._hash = hashlib.new(digest.partition(":")[0])
        self._reactor = reactor
        #: Chunks received and not handed to the disk yet, and their bytes.
        self._pending: list[bytes] = []
        self._batch_bytes = 0
        self._batch_call: IDelayedCall | None = None
        self._batch_due = False
        #: Bytes queued for the disk: pending, or being written.
        self._pending_bytes = 0
        #: Every chunk received and not written yet, from offset :attr:`written` on.
        self._queued: deque[bytes] = deque()
        self._writing = False
        self._ended = False
        self._paused = False
        self._timer = IdleTimer(reactor, idle_timeout, self._idle)
        self._resume: Resumer | None = None
        self._resumes = 0
        #: Bytes at the start of a resumed body that were received before.
        self._skip = 0
        self._upstream_bytes: Any = store.metrics.bytes_from_upstream.labels(upstream)
        #: Bytes received and not counted in :attr:`_upstream_bytes` yet (counted by batch).
        self._uncounted = 0
        #: Whether the body comes from the shared storage tier rather than the upstream.
        self.from_storage = False

    def read_from_storage(self) -> None:
        """Say that the body given to :meth:`start` comes from the shared storage tier."""
        self._count()
        self.from_storage = True
        self._upstream_bytes = self.store.metrics.bytes_from_storage

    def __repr__(self) -> str:
        state = "committed" if self.committed else "failed" if self.error else "filling"
        return f"<Fill {self.digest} {self.written}/{self.size} from {self.upstream} {state}>"

    def count_as(self, counter: Any) -> None:
        """Count the bytes received from now on with *counter* (another node's, not the
        upstream's)."""
        self._count()
        self._upstream_bytes = counter

    def _count(self) -> None:
        """Add the bytes received since the last time to their counter."""
        if self._uncounted:
            self._upstream_bytes.inc(self._uncounted)
            self._uncounted = 0

    def queued(self, offset: int, limit: int) -> bytes:
        """Bytes [offset, limit) from memory, received and not written yet.

        A span that is one whole chunk as received is returned as is, without
        a copy.
        """
        if offset < self.written or limit > self.received:
            raise ValueError(f"[{offset}, {limit}) is not queued")
        queue = self._queued
        index, start = len(queue), self.received
        while start > offset:
            index -= 1
            start -= len(queue[index])
        pieces = []
        while start < limit:
            chunk = queue[index]
            pieces.append(chunk[max(offset - start, 0) : limit - start])
            start += len(chunk)
            index += 1
        return b"".join(pieces)

    # --- starting --------------------------------------------------------------

    async def start(
        self,
        response: IResponse,
        idle_timeout: float | None = None,
        resume: Resumer | None = None,
    ) -> None:
        """Create the temporary file and take in *response*'s body.

        The blobs evicted to make room are gone from the disk first, so the
        cache never holds more than its quota.  *idle_timeout* overrides the
        seconds the upstream may stay silent.  If the body breaks, *resume*
        is asked for the rest (a few times), and the readers never notice:
        what was received is kept, and the digest is checked over the whole.
        """
        self._resume = resume
        if await self.open(idle_timeout):
            response.deliverBody(self)
        else:
            discard(response)

    async def open(self, idle_timeout: float | None = None) -> bool:
        """Create the temporary file, once the evicted blobs are gone; False if abandoned."""
        if idle_timeout is not None:
            self._timer.timeout = idle_timeout
        try:
            for d in self._evictions:
                await d
            self._fd = await self._run(self._create)
        except OSError as e:
            self.abandon(CacheWriteError(f"cannot write to the cache: {e.strerror}"))
            return False
        if self.done:  # abandoned meanwhile (the service is stopping)
            self._close_and_remove()
            return False
        self.ready.fire(None)
        return True

    def _create(self) -> int:
        """The temporary file, open for writing (in a worker thread)."""
        return files.create_fill(self.temp_path)

    def abandon(self, error: Exception) -> None:
        """Give up before or during the body: nothing will be committed."""
        self._fail(error)

    # --- the upstream body -----------------------------------------------------

    @property
    def _upstream(self) -> IPushProducer | None:
        return cast(IPushProducer | None, self.transport)

    def connectionMade(self) -> None:
        read_large(self.transport)
        self._start_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        if self._skip:
            cut = min(self._skip, len(data))
            self._skip -= cut
            data = data[cut:]
            if not data:
                return
        self.received += len(data)
        self._uncounted += len(data)
        if self.received > self.size:
            self._fail(StreamError(f"upstream sent more than the {self.size} bytes announced"))
            return
        if not self._take(len(data)):
            return
        self._timer.touch()
        self._pending.append(data)
        self._queued.append(data)
        self._pending_bytes += len(data)
        self._batch_bytes += len(data)
        if self._pending_bytes >= HIGH_WATER and not self._paused and self._upstream:
            self._paused = True
            self._timer.stop()
            self._upstream.pauseProducing()
        self._write_next()
        self._notify()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._timer.stop()
        if self.done:
            return
        if not reason.check(ResponseDone):
            error = StreamError(f"upstream body failed: {printable(reason.getErrorMessage())}")
        elif self.received != self.size:
            error = StreamError(f"upstream sent {self.received} of {self.size} bytes")
        else:
            error = None
        self._count()
        if error is not None and self._resume is not None and self._resumes < RESUMES:
            self._resumes += 1
            Deferred.fromCoroutine(self._resume_body(self._resume, error))
        elif error is not None:
            self._fail(error)
        else:
            self._ended = True
            self._write_next()

    async def _resume_body(self, resume: Resumer, why: StreamError) -> None:
        """Take up a broken body where it broke, from whatever source *resume* finds."""
        offset = self.received
        log.info(
            "fill of {digest} broke after {offset} bytes ({why}); resuming",
            digest=self.digest,
            offset=offset,
            why=str(why),
        )
        try:
            response = await resume(offset)
        except (StreamError, RegistryError, OSError) as e:
            self._fail(StreamError(f"{why}; resuming failed: {e}"))
            return
        if self.done:
            discard(response)
            return
        self._skip = offset if response.code == 200 else 0
        self._paused = False
        response.deliverBody(self)

    # --- the disk --------------------------------------------------------------

    def _take(self, count: int) -> bool:
        """Count *count* more bytes taken in, reserving room for them; False if there is none.

        The fill then failed.
        """
        self.taken += count
        if self.taken <= self.reserved:
            return True
        evictions = self.store.grow(self)
        if isinstance(evictions, str):
            self._fail(CacheWriteError(f"no room left in the cache: {evictions}"))
            return False
        for evicted in evictions:
            self._evicting += 1
            evicted.addCallback(self._evicted)
        return True

    def _evicted(self, _: object) -> None:
        self._evicting -= 1
        self._write_next()

    def _batch_ready(self, now: bool = False) -> bool:
        """Whether the bytes pending go to the disk now; if not, they go within
        :data:`WRITE_DELAY` seconds."""
        if now or self._batch_due or self._batch_bytes >= WRITE_BATCH or self._paused:
            self._cancel_batch()
            return True
        if self._batch_call is None:
            self._batch_call = self._reactor.callLater(WRITE_DELAY, self._delay_over)
        return False

    def _delay_over(self) -> None:
        self._batch_call = None
        self._batch_due = True
        self._write_next()

    def _cancel_batch(self) -> None:
        if self._batch_call is not None:
            if self._batch_call.active():
                self._batch_call.cancel()
            self._batch_call = None

    def _take_batch(self) -> None:
        """Count the batch about to be written: its bytes are no longer pending."""
        self._batch_bytes = 0
        self._batch_due = False
        self._count()

    def _write_next(self) -> None:
        if self._writing or self._evicting or self.done:
            return
        if self._pending and self._batch_ready(self._ended):
            chunks, self._pending = self._pending, []
            self._take_batch()
            self._writing = True
            assert self._fd is not None
            self._run(_write, self._fd, chunks, self._hash).addCallbacks(
                self._wrote, self._write_failed
            )
        elif self._ended:
            self._verify()

    def _wrote(self, count: int) -> None:
        self._writing = False
        if self.error is not None:
            self._close_and_remove()
            return
        self.written += count
        self._pending_bytes -= count
        while count > 0:
            count -= len(self._queued.popleft())
        if self._paused and self._pending_bytes <= LOW_WATER and self._upstream:
            self._paused = False
            self._start_timer()
            self._upstream.resumeProducing()
        self._notify()
        self._write_next()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = False
        if self.error is not None:  # failed meanwhile, leaving the file to us
            self._close_and_remove()
            return
        self._fail(CacheWriteError(f"cannot write to the cache: {failure.getErrorMessage()}"))

    def _verify(self) -> None:
        actual = f"{self._hash.name}:{self._hash.hexdigest()}"
        if actual != self.digest:
            self.store.metrics.digest_mismatches.labels(self.upstream).inc()
            log.error(
                "blob {digest} from {upstream} hashes to {actual}: not cached",
                digest=self.digest,
                upstream=self.upstream,
                actual=actual,
            )
            self._fail(DigestMismatch(f"upstream bytes do not match {self.digest}"))
            return
        self.verified = True
        self._notify()
        fd, self._fd = self._fd, None
        self._writing = True  # the file is ours until it is in place
        self._run(files.install, fd, self.temp_path, self.store.path(self.digest)).addCallbacks(
            self._committed, self._write_failed
        )

    def _committed(self, _: object) -> None:
        self._writing = False
        if self.error is not None:  # the store was stopped meanwhile
            return
        self.committed = True
        self.store.committed(self)
        self._notify()
        self.finished.fire(None)

    # --- failure ---------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        if self.done:
            return
        self.error = error
        self._timer.stop()
        self._cancel_batch()
        self._count()
        if self._upstream is not None and not self._ended:
            self._upstream.stopProducing()
        self._pending = []
        self._queued.clear()
        log.warn(
            "fill of {digest} from {upstream} failed after {received} bytes: {error}",
            digest=self.digest,
            upstream=self.upstream,
            received=self.received,
            error=str(error),
        )
        if not self._writing:
            self._close_and_remove()
        self.store.failed(self)
        self._notify()
        self.ready.fire(error)
        self.finished.fire(error)

    def _close_and_remove(self) -> None:
        fd, self._fd = self._fd, None
        self._run(files.discard, fd, self.temp_path).addErrback(
            lambda f: log.failure("removing {path}", f, path=self.temp_path)
        )

    # --- the idle timer --------------------------------------------------------

    def _start_timer(self) -> None:
        if not self.done:
            self._timer.start()

    def _idle(self) -> None:
        self._fail(StreamError(f"upstream sent nothing for {self._timer.timeout:.0f}s"))


def _write(fd: int, chunks: list[bytes], hasher: Any) -> int:
    """Hash and append *chunks* (in a worker thread); returns the bytes written."""
    for chunk in chunks:
        hasher.update(chunk)
        files.write_all(fd, chunk)
    return sum(map(len, chunks))
