"""The storage tier's quota kept by one node: sizes and last reads, least recently used first."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from dockmirror._interfaces import IStorageRecords

if TYPE_CHECKING:  # the cache imports this package: no cycle when it is imported first
    from dockmirror.storage.records import IndexRecords

#: Seconds between listings of the bucket (by this node, or by one node of a cluster) ...
LISTING_INTERVAL = 24 * 3600.0
#: ... but after one that failed, this many, doubled at each failure in a row ...
LISTING_RETRY = 300.0
#: ... up to this many.
LISTING_RETRY_MAX = 3600.0


def listing_delay(failures: int) -> float:
    """Seconds from the start of a listing to the next one, *failures* having failed in a row
    (this one among them, until it ends well)."""
    if failures <= 0:
        return LISTING_INTERVAL
    return min(LISTING_RETRY * 2 ** min(failures - 1, 16), LISTING_RETRY_MAX)


@implementer(IStorageRecords)
class Quota:
    """What the bucket holds as far as this node knows, in LRU order, kept in its index.

    Objects being written (reserved) or read on this node are never chosen
    for eviction.  With no *max_size*, nothing is evicted.
    """

    shared = False

    def __init__(self, records: IndexRecords, max_size: int | None, clock: IReactorTime) -> None:
        self.records = records
        self.max_size = max_size
        self._clock = clock
        #: digest -> size, least recently used first.
        self._objects: OrderedDict[str, int] = OrderedDict()
        self._pins: Counter[str] = Counter()
        #: When objects were added while this node ran.
        self._added: dict[str, float] = {}
        #: When this node last began a listing of the bucket ...
        self._listed: float | None = None
        #: ... and how many listings failed in a row (that one too, until it ends well).
        self._failures = 0
        self.size = 0
        self.reserved = 0

    def __repr__(self) -> str:
        quota = f"/{self.max_size}" if self.max_size is not None else ""
        return f"<Quota {len(self._objects)} objects, {self.size}{quota} bytes>"

    def __contains__(self, digest: str) -> bool:
        return digest in self._objects

    def __len__(self) -> int:
        return len(self._objects)

    def load(self, objects: Iterable[tuple[str, int, float]]) -> None:
        for digest, size, _ in sorted(objects, key=lambda row: row[2]):
            self._put(digest, size)

    def _put(self, digest: str, size: int) -> None:
        self.size += size - self._objects.pop(digest, 0)
        self._objects[digest] = size

    def add(self, digest: str, size: int, now: float) -> None:
        """An object now exists (stored here, or found in the bucket)."""
        self._put(digest, size)
        self._added[digest] = self._clock.seconds()
        self.records.record(digest, size, now)

    def touch(self, digest: str) -> None:
        if digest in self._objects:
            self._objects.move_to_end(digest)
            self.records.touch(digest, self._clock.seconds())

    def forget(self, digest: str) -> None:
        size = self._objects.pop(digest, None)
        self._added.pop(digest, None)
        if size is not None:
            self.size -= size
            self.records.remove(digest)

    def lease(self, digest: str) -> Deferred[int | None]:
        self._pins[digest] += 1
        self.touch(digest)
        return succeed(self._objects.get(digest))

    def release(self, digest: str) -> None:
        self._pins[digest] -= 1
        if self._pins[digest] <= 0:
            del self._pins[digest]

    def in_use(self, digest: str) -> bool:
        return bool(self._pins[digest])

    def found(self, digest: str, size: int) -> None:
        if digest in self._objects:
            self.touch(digest)
        else:
            self.add(digest, size, self._clock.seconds())

    def reserve(self, digest: str, size: int) -> Deferred[list[str] | str]:
        """Make room for *size* more bytes: the objects to evict, forgotten here.

        On success the bytes are reserved and *digest* is pinned until :meth:`uploaded`.
        """
        if digest in self._objects:
            self.touch(digest)
            return succeed("stored already")
        victims = self.victims(size)
        if victims is None:
            return succeed("the storage quota is full of blobs in use")
        for victim in victims:
            self.forget(victim)
        self.reserved += size
        self._pins[digest] += 1
        return succeed(victims)

    def uploaded(self, digest: str, size: int, stored: bool) -> None:
        self.reserved -= size
        self.release(digest)
        if stored:
            self.add(digest, size, self._clock.seconds())

    def remove(self, digest: str) -> Deferred[bool]:
        if self.in_use(digest):
            return succeed(False)
        self.forget(digest)
        return succeed(True)

    def evicted(self, digest: str) -> None:
        pass

    def listing_due(self) -> Deferred[int | None]:
        """At start, a day after the last listing, and soon after one that failed."""
        now = self._clock.seconds()
        if self._listed is not None and now - self._listed < listing_delay(self._failures):
            return succeed(None)
        self._listed = now
        self._failures += 1
        return succeed(self._failures - 1)

    def listed(self) -> None:
        self._failures = 0

    def reconcile(self, found: dict[str, tuple[int, float]], since: float) -> Deferred[list[str]]:
        """Objects found are added, objects gone forgotten (unless read now, or stored since)."""
        for digest in list(self._objects):
            stored_since = self._added.get(digest, 0.0) >= since
            if digest not in found and not self.in_use(digest) and not stored_since:
                self.forget(digest)
        for digest, (size, modified) in sorted(found.items(), key=lambda item: item[1][1]):
            if digest not in self._objects:
                self.add(digest, size, min(modified, since))
        victims = self.victims() or []
        for victim in victims:
            self.forget(victim)
        return succeed(victims)

    def victims(self, needed: int = 0) -> list[str] | None:
        """The least recently used objects not in use whose removal makes *needed* bytes fit."""
        if self.max_size is None:
            return []
        excess = self.size + self.reserved + needed - self.max_size
        victims = []
        for digest, size in self._objects.items():
            if excess <= 0:
                break
            if not self.in_use(digest):
                victims.append(digest)
                excess -= size
        return victims if excess <= 0 else None

    def stats(self) -> dict[str, Any]:
        return {"objects": len(self._objects), "size": self.size}
