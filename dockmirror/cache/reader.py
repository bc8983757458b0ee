"""A reader of a cached blob, or of one being filled, written to one client."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorFDSet,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from dockmirror.cache.fill import Fill
from dockmirror.cache.follow import FollowedFill
from dockmirror.streaming import (
    FileSender,
    ShortFile,
    StreamError,
    file_transport,
    release,
)

if TYPE_CHECKING:
    from dockmirror.cache.blobs import BlobStore


#: Bytes read from a file per write to a client ...
CHUNK = 64 << 10
#: ... and chunks written to one client before other work gets a turn.
BURST = 16


@implementer(IPushProducer)
class BlobReader:
    """Bytes [start, end) of a blob file, written to a client as fast as it reads.

    While the blob is still being filled, the reader follows the body as it
    arrives: from the file, and from memory what is not written yet.  It
    never sends the last byte of its span, whole blob or range, before the
    fill is verified, and fails if the fill fails before that: a client never
    gets a complete answer of bytes that may turn out wrong.  Each reader has
    its own pace: the client pausing it pauses nothing else.  :attr:`done`
    fires with the byte count or fails with :class:`StreamError`.
    """

    def __init__(
        self,
        store: BlobStore,
        digest: str,
        fd: int,
        start: int,
        end: int,
        fill: Fill | FollowedFill | None,
        on_bytes: Callable[[int], None],
    ) -> None:
        self._store = store
        self.digest = digest
        self._fd: int | None = fd
        self._start = self._pos = start
        self._end = end
        self._fill = fill
        self._on_bytes = on_bytes
        self._consumer: IConsumer | None = None
        self._paused = False
        self._pumping = False
        self._later: IDelayedCall | None = None
        self._sender: FileSender | None = None
        self.done: Deferred[int] = Deferred(lambda _: self._close())

    def __repr__(self) -> str:
        return f"<BlobReader {self.digest} at {self._pos} of {self._start}-{self._end}>"

    def write_to(self, consumer: IConsumer) -> Deferred[int]:
        direct = file_transport(consumer) if self._whole() else None
        if direct is not None and direct[1] is None and self._fill is not None:
            # On plain TCP a fill in progress goes through Twisted: sent straight
            # from it, a slow client was cut at send_timeout while still reading.
            direct = None
        if direct is not None:
            assert self._fd is not None
            transport, sealer = direct
            reactor = cast(IReactorFDSet, self._store.reactor)
            self._sender = FileSender(
                reactor,
                transport,
                self._fd,
                self._start,
                self._end,
                self._on_bytes,
                sealer,
                growing=self if self._fill is not None else None,
            )
            self._sender.write_to(consumer).addCallbacks(self._sent, self._send_failed)
            if self._fill is not None:
                self._fill.subscribe(self._grown)
                self._grown()
            return self.done
        self._consumer = consumer
        if self._fill is not None:
            self._fill.subscribe(self._pump)
        consumer.registerProducer(self, True)
        self._pump()
        return self.done

    def _whole(self) -> bool:
        """Whether the reader sends a whole blob, cached or being filled."""
        size = self._fill.size if self._fill is not None else self._store.size_of(self.digest)
        return self._start == 0 and self._end == size

    def extent(self) -> tuple[int, int]:
        """The bytes in the file, and how far the reader may go now (for its sender)."""
        fill = self._fill
        on_disk = self._end if fill is None or fill.verified else fill.written
        return on_disk, self._readable()

    def queued(self, offset: int, limit: int) -> bytes:
        """Bytes of the fill not written yet (for the sender)."""
        assert self._fill is not None
        return self._fill.queued(offset, limit)

    def _grown(self) -> None:
        """The fill moved: its sender sends what it may, or the reader fails with it."""
        if not self._fill_failed() and self._sender is not None:
            self._sender.grown()

    def _fill_failed(self) -> bool:
        """Whether the fill failed before it was verified (then so did the reader)."""
        fill = self._fill
        if fill is None or fill.error is None or fill.verified:
            return False
        if not self.done.called:
            self._fail(StreamError(f"filling {self.digest} failed: {fill.error}"))
        return True

    def _sent(self, count: int) -> None:
        self._close()
        self.done.callback(count)

    def _send_failed(self, failure: Failure) -> None:
        if self.done.called or self._fd is None:  # cancelled or failed: it stopped the sender
            return
        if failure.check(ShortFile) and self._fill is None:
            self._store.forget(self.digest)
        error = failure.value
        self._fail(error if isinstance(error, StreamError) else StreamError(str(error)))

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._consumer = None  # the connection is gone
        if not self.done.called:
            self._close()
            self.done.errback(StreamError("the client went away"))

    def _readable(self) -> int:
        """How far the reader may go now."""
        fill = self._fill
        if fill is None or fill.verified:
            return self._end
        return min(self._end - 1, fill.received)

    def _finished(self) -> bool:
        fill = self._fill
        return self._pos >= self._end and (fill is None or fill.verified)

    def _pump(self) -> None:
        """Write chunks until the client pauses, the file has no more, or a burst is done."""
        if self._pumping or self._fd is None:
            return
        self._pumping = True
        try:
            for _ in range(BURST):
                if self._paused or self._fd is None or self._fill_failed():
                    return
                if not self._send(self._readable()):
                    return
            # Let the reactor breathe before the next burst.
            if self._later is None:
                self._later = self._store.reactor.callLater(0, self._continue)
        finally:
            self._pumping = False

    def _continue(self) -> None:
        self._later = None
        self._pump()

    def _send(self, limit: int) -> bool:
        """Send the next chunk below *limit*; False once there is nothing to send now."""
        if self._pos < limit:
            assert self._fd is not None and self._consumer is not None
            count = min(CHUNK, limit - self._pos)
            fill = self._fill
            on_disk = self.extent()[0]
            if self._pos < on_disk:
                count = min(count, on_disk - self._pos)
                data = os.pread(self._fd, count, self._pos)
            elif count < CHUNK and limit < self._end - 1:
                return False  # in memory; wait for a whole chunk
            else:  # received, not written yet
                assert fill is not None
                data = fill.queued(self._pos, self._pos + count)
            if len(data) != count:
                self._fail(StreamError(f"cached {self.digest} is shorter than recorded"))
                if self._fill is None:
                    self._store.forget(self.digest)
                return False
            self._pos += count
            self._on_bytes(count)
            self._consumer.write(data)
        if self._finished():
            self._close()
            self.done.callback(self._pos - self._start)
            return False
        return self._pos < limit

    def _fail(self, error: StreamError) -> None:
        self._close()
        self.done.errback(error)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._sender is not None and not self._sender.done.called:
            self._sender.done.cancel()  # before its file is closed
        os.close(fd)
        self._store.unpin(self.digest)
        if self._later is not None and self._later.active():
            self._later.cancel()
        if self._fill is not None:
            self._fill.unsubscribe(self._pump)
            self._fill.unsubscribe(self._grown)
        if self._consumer is not None:
            release(self._consumer)
            self._consumer = None
