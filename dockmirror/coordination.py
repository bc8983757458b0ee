"""Coordination between the processes that share one cache directory.

:class:`LocalCoordinator` serves a lone process: every claim is granted.
:class:`FileLockCoordinator` serves the worker processes of one machine with
POSIX byte-range locks on one file, ``fills.lock`` in the cache directory:
the claim on a digest is an exclusive lock on one byte, at an offset taken
from the digest.  The kernel drops a dead process's locks, so a crashed
filler frees its digests at once.  Every call is one non-blocking system
call on a local file, cheap enough for the reactor thread.

A coordinator for several machines (PostgreSQL advisory locks) would be a
third provider of :class:`~dockmirror._interfaces.ICoordinator`.
"""

from __future__ import annotations

import fcntl
import os

from zope.interface import implementer

from dockmirror._interfaces import ICoordinator

#: The lock file, in the cache directory, with the mode of the cache's files.
LOCK_FILE = "fills.lock"
LOCK_FILE_MODE = 0o640
#: Lock offsets are taken from this many hex digits of a digest (60 bits).
_OFFSET_DIGITS = 15


def _offset(digest: str) -> int:
    """The byte locked for *digest* (``algorithm:hex`` or the bare hex)."""
    return int(digest.rpartition(":")[2][:_OFFSET_DIGITS], 16)


@implementer(ICoordinator)
class LocalCoordinator:
    """One process alone on its cache: it holds every claim it asks for."""

    shared = False

    def __repr__(self) -> str:
        return "<LocalCoordinator>"

    def claim(self, digest: str) -> bool:
        return True

    def release(self, digest: str) -> None:
        pass

    def held_elsewhere(self, digest: str) -> bool:
        return False

    def close(self) -> None:
        pass


@implementer(ICoordinator)
class FileLockCoordinator:
    """Claims as ``lockf`` byte-range locks on one file, shared by the processes of a machine.

    POSIX locks belong to the process and vanish when any of its descriptors
    of the file is closed, so the file is opened once, here, and nowhere else.
    """

    shared = True

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_FILE_MODE)
        self._held: set[str] = set()

    def __repr__(self) -> str:
        return f"<FileLockCoordinator {self.path}: {len(self._held)} claims held>"

    def _lock(self, digest: str, operation: int) -> bool:
        try:
            fcntl.lockf(self._fd, operation | fcntl.LOCK_NB, 1, _offset(digest))
        except OSError:  # EACCES or EAGAIN: another process holds it
            return False
        return True

    def claim(self, digest: str) -> bool:
        if digest in self._held:
            return True
        if not self._lock(digest, fcntl.LOCK_EX):
            return False
        self._held.add(digest)
        return True

    def release(self, digest: str) -> None:
        if digest in self._held:
            self._held.discard(digest)
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _offset(digest))

    def held_elsewhere(self, digest: str) -> bool:
        if digest in self._held:
            return False
        # A shared lock is granted unless another process holds the exclusive one.
        if not self._lock(digest, fcntl.LOCK_SH):
            return True
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _offset(digest))
        return False

    def close(self) -> None:
        self._held.clear()
        os.close(self._fd)
