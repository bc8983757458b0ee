"""The storage tier's quota: object sizes and last reads, evicted least recently used first."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable

from dockmirror._interfaces import IStorageRecords


class Quota:
    """What the bucket holds as far as this node knows, in LRU order.

    Objects being written (reserved) or read on this node are never chosen
    for eviction.  With no *max_size*, nothing is evicted.
    """

    def __init__(self, records: IStorageRecords, max_size: int | None) -> None:
        self.records = records
        self.max_size = max_size
        #: digest -> size, least recently used first.
        self._objects: OrderedDict[str, int] = OrderedDict()
        self._pins: Counter[str] = Counter()
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
        """Take in recorded objects (digest, size, used), in any order."""
        for digest, size, _ in sorted(objects, key=lambda row: row[2]):
            self._put(digest, size)

    def _put(self, digest: str, size: int) -> None:
        self.size += size - self._objects.pop(digest, 0)
        self._objects[digest] = size

    def add(self, digest: str, size: int, now: float) -> None:
        """An object now exists (stored here, or found in the bucket)."""
        self._put(digest, size)
        self.records.record(digest, size, now)

    def touch(self, digest: str, now: float) -> None:
        if digest in self._objects:
            self._objects.move_to_end(digest)
            self.records.touch(digest, now)

    def forget(self, digest: str) -> None:
        size = self._objects.pop(digest, None)
        if size is not None:
            self.size -= size
            self.records.remove(digest)

    def digests(self) -> list[str]:
        return list(self._objects)

    def pin(self, digest: str) -> None:
        self._pins[digest] += 1

    def pinned(self, digest: str) -> bool:
        return bool(self._pins[digest])

    def unpin(self, digest: str) -> None:
        self._pins[digest] -= 1
        if self._pins[digest] <= 0:
            del self._pins[digest]

    def reserve(self, digest: str, size: int) -> list[str] | None:
        """Make room for *size* more bytes: the objects to evict, or None if it can't be made.

        On success the bytes are reserved (until :meth:`unreserve`) and
        *digest* is pinned (until :meth:`unpin`); the victims are forgotten
        here, the caller deletes them.
        """
        victims = self.victims(size)
        if victims is None:
            return None
        for victim in victims:
            self.forget(victim)
        self.reserved += size
        self.pin(digest)
        return victims

    def unreserve(self, size: int) -> None:
        self.reserved -= size

    def victims(self, needed: int = 0) -> list[str] | None:
        """The least recently used objects not in use whose removal makes *needed* bytes fit."""
        if self.max_size is None:
            return []
        excess = self.size + self.reserved + needed - self.max_size
        victims = []
        for digest, size in self._objects.items():
            if excess <= 0:
                break
            if not self.pinned(digest):
                victims.append(digest)
                excess -= size
        return victims if excess <= 0 else None
