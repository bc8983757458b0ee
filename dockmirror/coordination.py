"""Coordination between the processes that share one cache directory.

:class:`LocalCoordinator` serves a lone process: every claim is granted.
:class:`FileLockCoordinator` serves the worker processes of one machine with
POSIX byte-range locks on one file, ``fills.lock`` in the cache directory:
the claim on a digest is an exclusive lock on one byte, at an offset taken
from the digest.  The kernel drops a dead process's locks, so a crashed
filler frees its digests at once.  A process reading a blob holds a shared
lock on another byte of the digest's (its pin), so that no other process
removes the blob under it (a follower of a fill would take its removal for
the fill's failure); a process removing a blob holds that byte exclusively
from its look for readers until the file is gone, so a reader that comes in
between is refused its pin instead of being cut.  The last reads of blobs
are also written in ``recent``, a small table every process maps, so that
eviction sees a blob read in another process before its use reaches the
index.  The bytes the cache holds and reserves, which every worker checks
the quota against, are counters in the file ``usage``, changed under a lock
on one more byte of ``fills.lock``: one for the bytes held, and one slot per
process for the bytes its fills in progress reserve, and for those they have
yet to reserve (what their upstreams announced).  Each process holds the
lock of its slot for its life, so the slot of a process that died (even by
SIGKILL) is seen to be free and its reservations stop counting: the shared
usage heals itself.  Every call is a few system calls on local files, held
for microseconds, cheap enough for the reactor thread.

Neither knows of other machines: :meth:`lead` always answers that this
process fetches from the upstream.  The nodes of a cluster coordinate
through PostgreSQL, above one of these, with
:class:`dockmirror.cluster.coordinator.ClusterCoordinator`.

:class:`SharedFlights` does a piece of work (a manifest's fetch) once for
every process: the one that claims its key does it, and tells the others.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from zope.interface import implementer

from dockmirror._interfaces import ICoordinator, INotifier

log = Logger()

#: The lock file, in the cache directory, with the mode of the cache's files.
LOCK_FILE = "fills.lock"
LOCK_FILE_MODE = 0o640
#: Lock offsets are taken from this many hex digits of a digest (60 bits) ...
_OFFSET_DIGITS = 15
#: ... for claims, and above this for read pins ...
_PIN_OFFSET = 1 << 61
#: ... and the usage counters' lock lies beyond them, ...
_USAGE_OFFSET = 1 << 62
#: ... followed by the lock of each process's reservation slot.
_SLOT_OFFSET = _USAGE_OFFSET + 1
#: The usage counters, in the cache directory; the supervisor removes the file at start.
USAGE_FILE = "usage"
#: The last reads of blobs, in the cache directory: slots of a digest's first 8 bytes
#: and the time of its last read, at a slot taken from the digest.
RECENT_FILE = "recent"
RECENT_SLOTS = 1 << 14
_RECENT = struct.Struct("<Qd")
#: The blobs kept from eviction (the warm images'), one digest a line, in the cache
#: directory: written by the worker that warms, read by the others.
KEPT_FILE = "kept"
#: Files of shared state that a new service starts without.
SERVICE_FILES = (USAGE_FILE, KEPT_FILE, RECENT_FILE)
#: Processes that may share a cache directory at once.
SLOTS = 256
#: The usage file: the bytes held, whether a process counted them, and the slots:
#: the bytes reserved, then the bytes yet to reserve.
_USAGE = struct.Struct(f"<qq{2 * SLOTS}q")
#: The slots taken by coordinators of this process (POSIX locks cannot tell them apart).
_slots_here: set[int] = set()


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
        self._promised = 0

    def __repr__(self) -> str:
        return "<LocalCoordinator>"

    def start_usage(self, total: int) -> None:
        self._usage = total

    def add_usage(self, delta: int) -> int:
        self._usage += delta
        return self._usage

    def reserve(self, delta: int) -> int:
        return self.add_usage(delta)

    def promise(self, delta: int) -> int:
        self._promised += delta
        return self._promised

    def claim(self, digest: str) -> bool:
        return True

    def release(self, digest: str) -> None:
        pass

    def held_elsewhere(self, digest: str) -> bool:
        return False

    def lead(self, digest: str, size: int, offset: int = 0) -> Deferred[IResponse | None]:
        return succeed(None)

    def pin(self, digest: str) -> bool:
        return True

    def unpin(self, digest: str) -> None:
        pass

    def exclude(self, digest: str) -> bool:
        return True

    def readmit(self, digest: str) -> None:
        pass

    def read_at(self, digest: str, when: float) -> None:
        pass

    def last_read(self, digest: str) -> float | None:
        return None

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
        self._recent = _map_recent(os.path.join(directory, RECENT_FILE))
        self._held: set[str] = set()
        #: Digests this process keeps every other from pinning (it removes them).
        self._excluded: set[str] = set()
        self._slot = 0
        self._take_slot()

    def __repr__(self) -> str:
        return f"<FileLockCoordinator {self.path}: {len(self._held)} claims held>"

    def _lock(self, digest: str, operation: int) -> bool:
        # EACCES or EAGAIN: another process holds it.
        return self._lock_byte(_offset(digest), operation)

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

    def pin(self, digest: str) -> bool:
        # A shared lock is granted unless another process holds the exclusive one.
        if digest in self._excluded:  # POSIX would turn our exclusive lock into this one
            return False
        return self._lock_byte(_PIN_OFFSET + _offset(digest), fcntl.LOCK_SH)

    def unpin(self, digest: str) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _PIN_OFFSET + _offset(digest))

    def exclude(self, digest: str) -> bool:
        # An exclusive lock is granted unless another process holds a shared one.
        if not self._lock_byte(_PIN_OFFSET + _offset(digest), fcntl.LOCK_EX):
            return False
        self._excluded.add(digest)
        return True

    def readmit(self, digest: str) -> None:
        if digest in self._excluded:
            self._excluded.discard(digest)
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _PIN_OFFSET + _offset(digest))

    def read_at(self, digest: str, when: float) -> None:
        key, slot = _recent_slot(digest)
        _RECENT.pack_into(self._recent, slot, key, when)

    def last_read(self, digest: str) -> float | None:
        key, slot = _recent_slot(digest)
        found, when = _RECENT.unpack_from(self._recent, slot)
        return float(when) if found == key else None

    def _take_slot(self) -> None:
        """Take a free reservation slot, for as long as this process lives."""
        for slot in range(SLOTS):
            if slot not in _slots_here and self._lock_byte(_SLOT_OFFSET + slot, fcntl.LOCK_EX):
                _slots_here.add(slot)
                self._slot = slot
                self._change_usage(0, 0, clear=True)  # a dead process's leftovers
                return
        raise RuntimeError(f"more than {SLOTS} processes share {self.path}")

    def _lock_byte(self, offset: int, operation: int) -> bool:
        try:
            fcntl.lockf(self._fd, operation | fcntl.LOCK_NB, 1, offset)
        except OSError:
            return False
        return True

    def _alive(self, slot: int) -> bool:
        """Whether a live process holds *slot* (a shared lock is granted on a free one)."""
        if slot in _slots_here:
            return True
        if not self._lock_byte(_SLOT_OFFSET + slot, fcntl.LOCK_SH):
            return True
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _SLOT_OFFSET + slot)
        return False

    def _change_usage(
        self,
        held: int,
        reserved: int,
        promised: int = 0,
        start: bool = False,
        clear: bool = False,
    ) -> tuple[int, int]:
        """Change the counters; the totals held and reserved, and promised, by the live
        processes.

        Held for a read and a write of the counters, and freed by the kernel if we die.
        """
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, _USAGE_OFFSET)
        try:
            data = os.pread(self._usage_fd, _USAGE.size, 0)
            before = _USAGE.unpack(data.ljust(_USAGE.size, b"\0"))
            total, counted, *slots = before
            if start and not counted:
                total, counted = held, 1
            elif not start:
                total += held
            mine = self._slot
            if clear:
                slots[mine] = slots[SLOTS + mine] = 0
            slots[mine] += reserved
            slots[SLOTS + mine] += promised
            for slot in range(SLOTS):
                if (slots[slot] or slots[SLOTS + slot]) and not self._alive(slot):
                    slots[slot] = slots[SLOTS + slot] = 0
            after = (total, counted, *slots)
            if after != before:
                os.pwrite(self._usage_fd, _USAGE.pack(*after), 0)
            return total + sum(slots[:SLOTS]), sum(slots[SLOTS:])
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _USAGE_OFFSET)

    def start_usage(self, total: int) -> None:
        self._change_usage(total, 0, start=True)

    def add_usage(self, delta: int) -> int:
        return self._change_usage(delta, 0)[0]

    def reserve(self, delta: int) -> int:
        return self._change_usage(0, delta)[0]

    def promise(self, delta: int) -> int:
        return self._change_usage(0, 0, delta)[1]

    def close(self) -> None:
        self._held.clear()
        self._excluded.clear()
        _slots_here.discard(self._slot)
        self._recent.close()
        os.close(self._usage_fd)
        os.close(self._fd)


def _map_recent(path: str) -> mmap.mmap:
    """The table of last reads, made at its size by the first process to open it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_FILE_MODE)
    try:
        size = RECENT_SLOTS * _RECENT.size
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)  # zeros: no digest
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _recent_slot(digest: str) -> tuple[int, int]:
    """A digest's key in the table of last reads (never 0) and its slot's offset."""
    key = int(digest.rpartition(":")[2][:16], 16) | 1
    return key, (key >> 1) % RECENT_SLOTS * _RECENT.size


@implementer(INotifier)
class LocalNotifier:
    """A lone process: nobody to tell, nobody to hear from."""

    def __repr__(self) -> str:
        return "<LocalNotifier>"

    def publish(self, topic: str, message: list[str]) -> None:
        pass

    def subscribe(self, topic: str, listener: Callable[[list[str]], None]) -> None:
        pass


#: Seconds a process waits for the flight of another ...
FLIGHT_WAIT = 60.0
#: ... looking this often whether that process still holds it ...
FLIGHT_POLL = 0.05
#: ... (or, for a flight of the whole cluster, whether another node still does) ...
CLUSTER_FLIGHT_POLL = 0.25
#: ... and waiting this long for its result once it let go.
FLIGHT_GRACE = 0.5
#: The most strings in a flight's result.
FLIGHT_RESULT_MAX = 8
#: Seconds a result is taken as is by those who ask just after it came (by default) ...
FLIGHT_RECENT = 1.0
#: ... and the most results kept so.
FLIGHT_RECENT_MAX = 1024


class ClusterClaims(Protocol):
    """Claims that one process of a whole cluster holds at a time (see :class:`SharedFlights`)."""

    def claim(self, flight: str, recent: float) -> Deferred[tuple[bool, list[str] | None]]:
        """Try to take *flight*'s claim, without waiting: whether it was taken (also when
        PostgreSQL cannot tell), and the result its last holder left in the last *recent*
        seconds, if any (then the claim is not taken)."""

    def release(self, flight: str, result: list[str] | None) -> None:
        """Let go of the claim, leaving *result* (if any) for those who take it just after."""


#: Asked at each poll of a waiting process, with whether it still waits: whether the
#: work is its own now.
Turn = Callable[[Callable[[], bool]], Deferred[bool]]


class SharedFlights:
    """Work done by one process for all: the one that claims a key, the others wait.

    The claim is an :class:`~dockmirror._interfaces.ICoordinator` claim on
    a digest made from the key, so a crashed process lets go of it.  The
    process that did the work publishes its result (a list of strings) on
    *topic* to every process, waiting or not: :attr:`on_result` listeners
    take it in.  A waiter does the work itself when the claim ends without
    a result (it failed), or after :data:`FLIGHT_WAIT` seconds.

    A flight of the *cluster* (:meth:`wait`) is done once by all the nodes
    of a cluster (:attr:`cluster`): the process of a node that holds the
    node's claim also takes the cluster's, or waits for the node holding it.
    """

    def __init__(self, reactor: IReactorTime, topic: str) -> None:
        self._reactor = reactor
        self.topic = topic
        self.coordinator: ICoordinator = LocalCoordinator()
        #: The claims of the cluster's nodes, if this node is one.
        self.cluster: ClusterClaims | None = None
        self._notifier: INotifier = LocalNotifier()
        #: Called with each result another process published, before its waiters resume.
        self.on_result: list[Callable[[list[str]], None]] = []
        self._waiting: dict[str, list[Deferred[list[str] | None]]] = {}
        self._held: set[str] = set()
        self._held_in_cluster: set[str] = set()
        #: Results heard or made in the last :data:`FLIGHT_RECENT` seconds, oldest first.
        self._recent: OrderedDict[str, tuple[list[str], float]] = OrderedDict()

    def __repr__(self) -> str:
        return f"<SharedFlights {self.topic}: {len(self._held)} held, {len(self._waiting)} awaited>"

    def share(self, notifier: INotifier) -> None:
        self._notifier = notifier
        notifier.subscribe(self.topic, self._heard)

    async def wait(
        self, key: str, cluster: bool = False, recent: float = FLIGHT_RECENT
    ) -> list[str] | None:
        """Another process's result for *key*; None when this process is to do the work.

        It then holds the claim until :meth:`done`.  With *cluster*, the
        processes of every node of the cluster share the work, not only
        those of this node.  A result heard less than *recent* seconds ago
        is the answer at once.
        """
        flight = _flight(key)
        heard = self._recent.get(flight)
        if heard is not None and self._reactor.seconds() - heard[1] < recent:
            return heard[0]
        if not self._claim(flight):
            turn = self._local_turn(flight)
            result = await self._await(flight, turn, FLIGHT_POLL, FLIGHT_POLL)
            if result is not None or flight not in self._held:  # heard, or waited too long
                return result
        if not cluster or self.cluster is None:
            return None
        turn = self._cluster_turn(self.cluster, flight, recent)
        result = await self._await(flight, turn, 0.0, CLUSTER_FLIGHT_POLL)
        if result is not None:  # another node did it; this node's waiters heard it too
            self._release(flight, None)
        return result

    def _local_turn(self, flight: str) -> Turn:
        """Whether the work is ours now: the process of this node holding it let go."""
        released: float | None = None

        def turn(waiting: Callable[[], bool]) -> Deferred[bool]:
            nonlocal released
            now = self._reactor.seconds()
            if self.coordinator.held_elsewhere(flight):
                released = None
            elif released is None:
                released = now
            elif now - released >= FLIGHT_GRACE and self._claim(flight):
                return succeed(True)  # it gave up: the work is ours now
            return succeed(False)

        return turn

    def _cluster_turn(self, claims: ClusterClaims, flight: str, recent: float) -> Turn:
        """Whether the work is ours now: we took the cluster's claim, and no result came.

        When another node held the claim, its result is given a grace to arrive.
        """
        tries = 0

        async def turn(waiting: Callable[[], bool]) -> bool:
            nonlocal tries
            tries += 1
            got, left = await claims.claim(flight, recent)
            if left is not None:  # its holder let go just now: its news may be on its way
                self._heard([flight, *left])
            if not got:
                return False
            if tries > 1 and waiting():
                await deferLater(self._reactor, FLIGHT_GRACE, lambda: None)
            if not waiting():  # a result came meanwhile: the claim is not needed
                claims.release(flight, None)
                return False
            self._held_in_cluster.add(flight)
            return True

        return lambda waiting: Deferred.fromCoroutine(turn(waiting))

    async def _await(
        self, flight: str, turn: Turn, first: float, interval: float
    ) -> list[str] | None:
        """The result heard for *flight*; None once *turn* says the work is ours.

        *turn* is asked after *first* seconds, then every *interval* seconds.
        """
        waiter: Deferred[list[str] | None] = Deferred()
        self._waiting.setdefault(flight, []).append(waiter)
        deadline = self._reactor.seconds() + FLIGHT_WAIT
        timer: IDelayedCall | None = None

        def waiting() -> bool:
            return not waiter.called

        def decided(ours: bool) -> None:
            nonlocal timer
            if waiter.called:
                return
            if ours or self._reactor.seconds() >= deadline:
                waiter.callback(None)
            else:
                timer = self._reactor.callLater(interval, poll)

        def failed(failure: Failure) -> None:
            log.failure("waiting for a {topic} flight", failure, topic=self.topic)
            decided(True)  # do the work rather than wait for nothing

        def poll() -> None:
            turn(waiting).addCallbacks(decided, failed)

        timer = self._reactor.callLater(first, poll)
        try:
            return await waiter
        finally:
            if timer.active():
                timer.cancel()
            waiting_here = self._waiting.get(flight, [])
            if waiter in waiting_here:
                waiting_here.remove(waiter)
            if not waiting_here:
                self._waiting.pop(flight, None)

    def done(self, key: str, result: list[str] | None) -> None:
        """Tell every process the *result* of the work on *key* (None: it failed), and let go."""
        flight = _flight(key)
        self._release(flight, result)
        if result is not None:
            self._notifier.publish(self.topic, [flight, *result])
            self._remember(flight, result)
            for waiter in self._waiting.pop(flight, []):  # this process's own
                if not waiter.called:
                    waiter.callback(result)

    def _release(self, flight: str, result: list[str] | None) -> None:
        if flight in self._held:
            self._held.discard(flight)
            self.coordinator.release(flight)
        if flight in self._held_in_cluster:
            self._held_in_cluster.discard(flight)
            if self.cluster is not None:
                self.cluster.release(flight, result)

    def _remember(self, flight: str, result: list[str]) -> None:
        """Keep *result* for :data:`FLIGHT_RECENT` seconds, for those who come just after."""
        recent = self._recent
        recent.pop(flight, None)
        recent[flight] = (result, self._reactor.seconds())
        if len(recent) > FLIGHT_RECENT_MAX:
            recent.popitem(last=False)

    def _claim(self, flight: str) -> bool:
        if flight in self._held or not self.coordinator.claim(flight):
            return False
        self._held.add(flight)
        return True

    def _heard(self, message: list[str]) -> None:
        if not 2 <= len(message) <= FLIGHT_RESULT_MAX + 1:
            return
        flight, *result = message
        self._remember(flight, result)
        for listener in self.on_result:
            listener(result)
        for waiter in self._waiting.pop(flight, []):
            if not waiter.called:
                waiter.callback(result)


def _flight(key: str) -> str:
    """The digest whose claim stands for the work on *key*."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
