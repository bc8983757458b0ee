"""A fill that another process runs, followed through its temporary file.

When another worker holds a digest's claim, this process's readers follow
that worker's temporary file as it grows, as they follow a fill of their
own.  The file says how far it got; the final name says the blob was
verified (it is only given after the size and digest matched and the file
was made durable); the claim ending without that name says the fill failed
or its worker died.  Readers keep the last byte back until then.  A fill
written in ranged parts says how far its contiguous prefix got in a file
of its own (:mod:`dockmirror.cache.parts`): its file's size counts bytes
written ahead, with holes before them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from dockmirror._interfaces import ICoordinator
from dockmirror.cache.parts import PREFIX_SUFFIX, RANGED_SUFFIX, read_prefix
from dockmirror.cache.progress import FillProgress
from dockmirror.streaming import IDLE_TIMEOUT, StreamError

#: Seconds between looks at the followed file.
POLL_INTERVAL = 0.05


class FollowedFill(FillProgress):
    """Follows the fill of *digest* that another process holds the claim on.

    It offers readers what :class:`~dockmirror.cache.fill.Fill` offers
    them: :attr:`written`, :attr:`verified`, :attr:`error`, the
    :attr:`ready` and :attr:`finished` events, and change notifications.
    *find* names the temporary file once it exists; *ended* is called once,
    committed or not.
    """

    def __init__(
        self,
        digest: str,
        size: int,
        final_path: str,
        find: Callable[[], str | None],
        coordinator: ICoordinator,
        reactor: IReactorTime,
        ended: Callable[[FollowedFill], None],
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        # Until the temporary file is found, readers open the final one.
        FillProgress.__init__(self, digest, size, final_path)
        self.final_path = final_path
        self._find = find
        self._coordinator = coordinator
        self._reactor = reactor
        self._ended = ended
        self._idle_timeout = idle_timeout
        self._inode: int | None = None
        self._changed = reactor.seconds()
        self._loop = LoopingCall(self._poll)
        self._loop.clock = reactor

    def __repr__(self) -> str:
        state = "committed" if self.committed else "failed" if self.error else "followed"
        return f"<FollowedFill {self.digest} {self.written}/{self.size} {state}>"

    @property
    def received(self) -> int:
        """What readers may read: what is in the file (the filler's memory is its own)."""
        return self.written

    def queued(self, offset: int, limit: int) -> bytes:
        """Nothing is held in memory here; readers never read past :attr:`received`."""
        return b""

    def start(self) -> None:
        self._loop.start(POLL_INTERVAL, now=True)

    def abandon(self, error: Exception) -> None:
        self._end(error)

    def _poll(self) -> None:
        # The claim first: the filler renames, then releases.
        held = self._coordinator.held_elsewhere(self.digest)
        try:
            final = os.stat(self.final_path)
        except FileNotFoundError:
            final = None
        if final is not None:
            if final.st_size != self.size:
                self._end(StreamError(f"{self.digest} was cached with {final.st_size} bytes"))
                return
            self.written, self.verified = self.size, True
            self._end(None)
            return
        if not held:
            self._end(StreamError(f"the worker filling {self.digest} gave up"))
            return
        now = self._reactor.seconds()
        try:
            written = self._look()
        except OSError as e:
            self._end(StreamError(f"cannot follow the fill of {self.digest}: {e.strerror}"))
            return
        if written > self.written:
            self.written, self._changed = min(written, self.size), now
            self._notify()
        elif now - self._changed > self._idle_timeout:
            self._end(StreamError(f"the fill of {self.digest} made no progress"))

    def _look(self) -> int:
        """Bytes in the followed file; finds it first, and fails if it was replaced."""
        if self._inode is None:
            path = self._find()
            if path is None:
                return 0
            try:
                self._inode = os.stat(path).st_ino
            except FileNotFoundError:
                return 0
            self.temp_path = path
            self.ready.fire(None)
        try:
            st = os.stat(self.temp_path)
        except FileNotFoundError:  # renamed into place, or removed: the claim will tell
            return self.written
        if st.st_ino != self._inode:
            raise OSError(0, "another fill replaced it")
        if self.temp_path.endswith(RANGED_SUFFIX):
            # Written at offsets: only the prefix its filler recorded is contiguous.
            prefix = read_prefix(self.temp_path + PREFIX_SUFFIX)
            return self.written if prefix is None else min(prefix, st.st_size)
        return st.st_size

    def _end(self, error: Exception | None) -> None:
        if self.finished.fired:
            return
        self.error = error
        self.committed = error is None
        if self._loop.running:
            self._loop.stop()
        self._ended(self)
        self._notify()
        self.ready.fire(error)
        self.finished.fire(error)
