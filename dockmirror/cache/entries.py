"""What the blob store holds, and for whom: the base of the blob store.

:class:`BlobEntries` keeps the cached digests and their sizes, least recently
used first, and the bytes they count for the quota.  Who may read a blob is a
separate record, :meth:`BlobEntries.allowed`: a digest is served through an
upstream repository only once that repository proved it has it, by its own
answer to a HEAD or GET of the blob.  A manifest's mention proves nothing.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from dockmirror._interfaces import ICoordinator
from dockmirror.cache import files
from dockmirror.cache.fill import Fill
from dockmirror.cache.follow import FollowedFill
from dockmirror.cache.index import Index, Runner
from dockmirror.coordination import LocalCoordinator
from dockmirror.metrics import Metrics

log = Logger()

#: Digests not cached (yet) whose proofs, and announced sizes, are remembered ...
PROOFS = 1 << 16
#: ... and the upstream repositories remembered per such digest.
PROOFS_PER_DIGEST = 32


class BlobEntries:
    """The state every part of the blob store shares, and its lookups.

    Eviction (:mod:`dockmirror.cache.eviction`), then fills, reading and
    start-up (:mod:`dockmirror.cache.blobs`) build on it.
    """

    def __init__(
        self,
        directory: str,
        max_size: int | None,
        index: Index,
        reactor: IReactorTime,
        run: Runner,
        metrics: Metrics,
        min_free: int | None = None,
    ) -> None:
        """*min_free* is the space fills leave free; None scales it with the file system."""
        self.directory = directory
        self.min_free = min_free
        self.blobs_dir = os.path.join(directory, "blobs")
        self.temp_dir = os.path.join(directory, "tmp")
        self.max_size = max_size
        self.metrics = metrics
        self._index = index
        self.reactor = reactor
        self._run = run
        #: digest -> size, least recently used first.
        self._entries: OrderedDict[str, int] = OrderedDict()
        #: cached digest -> the origins (upstream repositories) that proved they have it.
        self._access: dict[str, set[str]] = {}
        #: digest not cached -> origin -> the size its upstream announced; bounded LRU.
        self._proofs: OrderedDict[str, dict[str, int | None]] = OrderedDict()
        self._pins: Counter[str] = Counter()
        #: Blobs this process is removing, kept from every reader (:meth:`_lock_out`).
        self._removing: set[str] = set()
        #: Blobs kept from eviction (the warm images'); see :meth:`keep`.
        self._kept: frozenset[str] = frozenset()
        self._fills: dict[str, Fill] = {}
        #: Fills that other processes run, followed here.
        self._followed: dict[str, FollowedFill] = {}
        #: Who fills what, when several processes share the directory.
        self.coordinator: ICoordinator = LocalCoordinator()
        #: Called with the digest and size of each blob added to the store ...
        self.on_add: list[Callable[[str, int], None]] = []
        #: ... with the digest of each blob read ...
        self.on_touch: list[Callable[[str], None]] = []
        #: ... with the digest of each blob removed from it ...
        self.on_remove: list[Callable[[str], None]] = []
        #: ... and again once its file is gone ...
        self.on_gone: list[Callable[[str], None]] = []
        #: ... with each new proof (origin, digest) of a cached blob, or of one being
        #: filled here ...
        self.on_grant: list[Callable[[str, str], None]] = []
        #: ... and with the origins whose proofs are all dropped (purged).
        self.on_disown: list[Callable[[set[str]], None]] = []
        #: Asks the other nodes of a cluster for a proof: the size of a digest that
        #: an origin proved it has to one of them, or None.
        self.proofs_elsewhere: Callable[[str, str], Awaitable[int | None]] | None = None
        #: Called once the blobs kept are written for the other processes to read.
        self.on_keep: list[Callable[[], None]] = []
        self._keeping: Deferred[None] = succeed(None)
        self.size = 0
        self.reserved = 0
        #: Bytes of blobs this process is removing, still counted by every process
        #: until their files are gone: as good as free here, as they are in :attr:`size`.
        self._freeing = 0
        #: Bytes the fills in progress have yet to reserve, as their upstreams announced.
        self.promised = 0

    def path(self, digest: str) -> str:
        algorithm, _, hexpart = digest.partition(":")
        return os.path.join(self.blobs_dir, algorithm, hexpart[:2], hexpart)

    # --- what is cached, and for whom -------------------------------------------

    def has(self, digest: str) -> bool:
        if digest not in self._entries:
            return self._adopt(digest)
        if self.coordinator.shared and digest not in self._pins and not self._on_disk(digest):
            # Another worker purged or evicted it.
            self.forget(digest)
            return False
        return True

    def _on_disk(self, digest: str) -> bool:
        try:
            os.stat(self.path(digest))
        except FileNotFoundError:
            return False
        except OSError:
            return True  # a transient error keeps it, as reading does
        return True

    def _adopt(self, digest: str, used: bool = True) -> bool:
        """Take in a blob that another process sharing the directory committed.

        One not *used* here is taken in as the least recently used: its row
        in the index says when it was used.
        """
        if not self.coordinator.shared or digest in self._fills or digest in self._removing:
            return False
        try:
            size = os.stat(self.path(digest)).st_size
        except OSError:
            return False
        self._add(digest, size, used)
        return True

    def size_of(self, digest: str, origin: str | None = None) -> int | None:
        """A blob's size: as cached or being filled, else as *origin*'s upstream announced it."""
        if digest in self._entries:
            return self._entries[digest]
        fill = self._fills.get(digest)
        if fill is not None:
            return fill.size
        return self._proofs.get(digest, {}).get(origin) if origin is not None else None

    def filling(self, digest: str) -> Fill | FollowedFill | None:
        return self._fills.get(digest) or self._followed.get(digest)

    def allowed(self, origin: str, digest: str) -> bool:
        """Whether the upstream repository *origin* proved that it has *digest*."""
        return origin in self._access.get(digest, ()) or origin in self._proofs.get(digest, {})

    def allow(self, origin: str, digest: str, size: int | None = None) -> None:
        """Record that the upstream repository *origin* has *digest*, as it just answered.

        Only the upstream's own answer is proof: a HEAD or GET of the blob
        that it answered 200, with the *size* it announced.  A cached blob's
        proofs are kept in the index; those of a blob not cached yet are kept
        in memory, a bounded number, until it is.
        """
        origin = sys.intern(origin)
        if digest in self._entries:
            self._grant(origin, digest)
            return
        if digest in self._fills:
            # Shared at once: the other processes and nodes following the fill need
            # not ask the upstream again.
            for hook in self.on_grant:
                hook(origin, digest)
        proofs = self._proofs.pop(digest, {})
        proofs.pop(origin, None)
        proofs[origin] = size
        if len(proofs) > PROOFS_PER_DIGEST:
            del proofs[next(iter(proofs))]
        self._proofs[digest] = proofs
        if len(self._proofs) > PROOFS:
            self._proofs.popitem(last=False)

    def _grant(self, origin: str, digest: str) -> None:
        origins = self._access.setdefault(digest, set())
        if origin not in origins:
            origins.add(origin)
            self._index.write("INSERT OR IGNORE INTO access VALUES (?, ?)", origin, digest)
            for hook in self.on_grant:
                hook(origin, digest)

    async def proved_elsewhere(self, origin: str, digest: str) -> bool:
        """Whether *origin* proved to another node of the cluster that it has *digest*.

        The proof, and the size, are then taken as this node's own.
        """
        if self.proofs_elsewhere is None:
            return False
        size = await self.proofs_elsewhere(origin, digest)
        if size is None:
            return False
        self.allow(origin, digest, size)
        return True

    def entries(self) -> list[tuple[str, int]]:
        """Every cached blob as (digest, size)."""
        return list(self._entries.items())

    def doubt(self, digest: str, origin: str | None = None) -> None:
        """Drop what upstreams announced for a blob not cached: it turned out wrong."""
        proofs = self._proofs.get(digest, {})
        if origin is None:
            proofs.clear()
        else:
            proofs.pop(origin, None)
        if not proofs:
            self._proofs.pop(digest, None)

    def touch(self, digest: str) -> None:
        if digest in self._entries:
            self._entries.move_to_end(digest)
            for hook in self.on_touch:
                hook(digest)
            now = self.reactor.seconds()
            if self.coordinator.shared:  # seen by every process's eviction at once
                self.coordinator.read_at(digest, now)
            self._index.write(
                "UPDATE blobs SET used = ? WHERE digest = ?", now, digest, key=("used", digest)
            )

    def _add(self, digest: str, size: int, used: bool = True) -> None:
        new = digest not in self._entries
        if new:
            self._entries[digest] = size
            self.size += size
            self.metrics.cache_size.set(self.size)
            for origin in self._proofs.pop(digest, {}):
                self._grant(origin, digest)
            for hook in self.on_add:
                hook(digest, size)
            if not used:
                self._entries.move_to_end(digest, last=False)
                return
            now = self.reactor.seconds()
            self._index.write("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)", digest, size, now)
        self.touch(digest)
        if new and self.coordinator.shared:  # the other processes see it, and may evict it, at once
            self._index.flush()

    def forget(self, digest: str) -> Deferred[None]:
        """Drop a blob from the store; fires once its file is gone."""
        size = self._entries.pop(digest, None)
        if size is None:
            return succeed(None)
        self.size -= size
        self.metrics.cache_size.set(self.size)
        self._access.pop(digest, None)
        for sql in (
            "DELETE FROM blobs WHERE digest = ?",
            "DELETE FROM manifests WHERE digest = ?",
            "DELETE FROM access WHERE digest = ?",
        ):
            self._index.write(sql, digest)
        for hook in self.on_remove:
            hook(digest)
        self._freeing += size
        d = self._run(files.remove, self.path(digest))

        def removed(gone: bool) -> None:
            self._freeing -= size
            if gone:  # by us: another worker may have removed it first
                self._hold(-size)

        def failed(failure: Failure) -> None:
            self._freeing -= size
            log.failure("removing cached {digest}", failure, digest=digest)

        def told(_: None) -> None:
            for hook in self.on_gone:
                hook(digest)

        d.addCallbacks(removed, failed)
        return d.addCallback(told)

    # --- bytes counted for the quota ------------------------------------------

    def _used(self) -> int:
        """Bytes held and reserved, by this process or by all that share the directory."""
        if self.coordinator.shared:
            return self.coordinator.add_usage(0) - self._freeing
        return self.size + self.reserved

    def _hold(self, delta: int) -> None:
        """Count bytes committed to (or removed from) the directory, for every process."""
        if self.coordinator.shared:
            self.coordinator.add_usage(delta)

    def _unreserve(self, size: int) -> None:
        self.reserved -= size
        self._reserve(-size)

    def _reserve(self, delta: int) -> None:
        """Count bytes this process reserves for a fill, which end with it if it dies."""
        if self.coordinator.shared:
            self.coordinator.reserve(delta)

    def _promise(self, delta: int) -> int:
        """Count bytes this process's fills have yet to reserve; those of every process."""
        self.promised += delta
        if self.coordinator.shared:
            return self.coordinator.promise(delta)
        return self.promised

    def disown(self, origins: set[str]) -> list[str]:
        """Forget that *origins* have any blob; returns the digests no origin has now."""
        for digest, proofs in list(self._proofs.items()):
            for origin in origins & proofs.keys():
                del proofs[origin]
            if not proofs:
                del self._proofs[digest]
        orphans = []
        for digest, have in list(self._access.items()):
            if have & origins:
                have -= origins
                if not have:
                    del self._access[digest]
                    orphans.append(digest)
        self._index.write_many(
            "DELETE FROM access WHERE origin = ?", ((origin,) for origin in origins)
        )
        for hook in self.on_disown:
            hook(origins)
        return [d for d in orphans if d in self._entries]

    def origins(self) -> set[str]:
        return {
            origin for have in (*self._access.values(), *self._proofs.values()) for origin in have
        }
