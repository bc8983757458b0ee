"""Coordination between the processes that share one cache directory.

:class:`LocalCoordinator` serves a lone process: every claim is granted.
:class:`FileLockCoordinator` serves the worker processes of one machine with
POSIX byte-range locks on one file, ``fills.lock`` in the cache directory:
the claim on a digest is an exclusive lock on one byte, at an offset taken
from the digest.  The kernel drops a dead process's locks, so a crashed
filler frees its digests at once.  The bytes the cache holds and reserves,
which every worker checks the quota against, are a counter in the file
``usage``, changed under a lock on one more byte of ``fills.lock``.  Every
call is a few system calls on local files, held for microseconds, cheap
enough for the reactor thread.

Neither knows of other machines: :meth:`lead` always answers that this
process fetches from the upstream.  The nodes of a cluster coordinate
through PostgreSQL, above one of these, with
:class:`dockmirror.cluster.coordinator.ClusterCoordinator`.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import IResponse
from zope.interface import implementer

from dockmirror._interfaces import ICoordinator, INotifier

#: The lock file, in the cache directory, with the mode of the cache's files.
LOCK_FILE = "fills.lock"
LOCK_FILE_MODE = 0o640
#: Lock offsets are taken from this many hex digits of a digest (60 bits) ...
_OFFSET_DIGITS = 15
#: ... and the usage counter's lock lies beyond them.
_USAGE_OFFSET = 1 << 62
#: The usage counter, in the cache directory; the supervisor removes it at start.
USAGE_FILE = "usage"


def _offset(digest: str) -> int:
    """The byte locked for *digest* (``algorithm:hex`` or the bare hex)."""
    return int(digest.rpartition(":")[2][:_OFFSET_DIGITS], 16)


@implementer(ICoordinator)
class LocalCoordinator:
    """One process alone on its cache: it holds every claim it asks for."""

    shared = False
    resumes = False

    def __init__(self) -> None:
        self._usage = 0

    def __repr__(self) -> str:
        return "<LocalCoordinator>"

    def start_usage(self, total: int) -> None:
        self._usage = total

    def add_usage(self, delta: int) -> int:
        self._usage += delta
        return self._usage

    def claim(self, digest: str) -> bool:
        return True

    def release(self, digest: str) -> None:
        pass

    def held_elsewhere(self, digest: str) -> bool:
        return False

    def lead(self, digest: str, size: int, offset: int = 0) -> Deferred[IResponse | None]:
        return succeed(None)

    def close(self) -> None:
        pass


@implementer(ICoordinator)
class FileLockCoordinator:
    """Claims as ``lockf`` byte-range locks on one file, shared by the processes of a machine.

    POSIX locks belong to the process and vanish when any of its descriptors
    of the file is closed, so the file is opened once, here, and nowhere else.
    """

    shared = True
    resumes = False

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_FILE)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, LOCK_FILE_MODE)
        self._usage_fd = os.open(os.path.join(directory, USAGE_FILE), flags, LOCK_FILE_MODE)
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

    def lead(self, digest: str, size: int, offset: int = 0) -> Deferred[IResponse | None]:
        return succeed(None)

    def _change_usage(self, delta: int, start: bool = False) -> int:
        # Held for a read and a write of 8 bytes, and freed by the kernel if we die.
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, _USAGE_OFFSET)
        try:
            data = os.pread(self._usage_fd, 8, 0)
            if start and len(data) == 8:
                return int.from_bytes(data, "little", signed=True)
            total = int.from_bytes(data, "little", signed=True) + delta if data else delta
            os.pwrite(self._usage_fd, total.to_bytes(8, "little", signed=True), 0)
            return total
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _USAGE_OFFSET)

    def start_usage(self, total: int) -> None:
        self._change_usage(total, start=True)

    def add_usage(self, delta: int) -> int:
        return self._change_usage(delta)

    def close(self) -> None:
        self._held.clear()
        os.close(self._usage_fd)
        os.close(self._fd)


@implementer(INotifier)
class LocalNotifier:
    """A lone process: nobody to tell, nobody to hear from."""

    def __repr__(self) -> str:
        return "<LocalNotifier>"

    def publish(self, topic: str, message: list[str]) -> None:
        pass

    def subscribe(self, topic: str, listener: Callable[[list[str]], None]) -> None:
        pass
