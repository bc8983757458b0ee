"""The blob store's quota: room made for fills by evicting the least recently used.

A fill reserves room for its blob as the bytes arrive, a step at a time
(:meth:`EvictingStore.grow`), never for the whole size the upstream
announced: an upstream announcing a large blob and sending little evicts
no more than one step's worth.  The rest of the announced size is only
promised: a fill is admitted when there would be blobs to evict for every
promise, so the fills admitted together find room for their later steps
(unless the blobs they counted on are read meanwhile).

Blobs being read (by any process), being filled, or kept for the warm
images (:meth:`EvictingStore.keep`) are never evicted.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dockmirror.cache import files
from dockmirror.cache.entries import BlobEntries
from dockmirror.cache.fill import Fill
from dockmirror.coordination import KEPT_FILE
from dockmirror.errors import RegistryError
from dockmirror.reference import check_digest

log = Logger()

#: Free space a fill must leave on the file system, unless ``min_free`` says
#: otherwise: the lesser of this ...
DISK_MARGIN = 256 << 20
#: ... and this share of the file system.
DISK_MARGIN_SHARE = 0.05
#: The most of the file of blobs kept that is read: a million digests.
KEPT_MAX = 100 << 20
#: Seconds after which a temporary file of the blobs kept is a crash's leftover.
KEPT_TEMP_AGE = 60.0
#: Seconds during which a blob read by any process counts as just used, whatever
#: the index says (its use reaches the index within a second or so).
RECENT = 10.0
#: A fill reserves room for its bytes, as they arrive, this many ahead of them ...
RESERVE_STEP = 64 << 20
#: ... or this fraction of the quota, if less ...
RESERVE_SHARE = 1 / 16
#: ... but no fewer than this many: a blob this small is reserved at once.
RESERVE_MIN = 1 << 20


class EvictingStore(BlobEntries):
    """The blob store's quota, the eviction that keeps it and the blobs kept from it."""

    # --- the quota ---------------------------------------------------------------

    @property
    def reserve_step(self) -> int:
        """The bytes a fill reserves ahead of those it received."""
        if self.max_size is None:
            return RESERVE_STEP
        return max(min(RESERVE_STEP, int(self.max_size * RESERVE_SHARE)), RESERVE_MIN)

    def grow(self, fill: Fill) -> list[Deferred[None]] | str:
        """Reserve room for *fill* up to a step beyond the bytes it took; or say why not.

        The bytes past the old reservation go to the disk once the blobs
        evicted for them are gone.
        """
        wanted = min(fill.size, fill.taken + self.reserve_step)
        more = wanted - fill.reserved
        evictions = self._make_room(more)
        if not isinstance(evictions, str):
            fill.reserved = wanted
            self._promise(-more)
        return evictions

    def _make_room(
        self, size: int, disk: int | None = None, promise: int | None = None
    ) -> list[Deferred[None]] | str:
        """Reserve *size* bytes and evict what must go for them; or say why there is no room.

        The reservation comes first, so that a process choosing its victims
        at the same time counts it, and each victim is claimed, so that no
        two processes count one victim's bytes as freed for themselves.  The
        file system must have room for *disk* bytes (by default *size*).
        With a *promise* of more bytes (a fill's admission), there must also
        be blobs to evict for them and for every other promise, but none is
        evicted for them yet.
        """
        self.reserved += size
        self._reserve(size)
        victims = self._victims(0 if promise is None else self._promise(promise))
        reason = None
        if victims is None:
            reason = "cache full of blobs in use"
        else:
            victims = self._spare(victims)
            if not self._disk_has_room(
                (size if disk is None else disk) - sum(self._entries[d] for d in victims)
            ):
                reason = "disk full"
                for victim in victims:
                    self._let_in(victim)
        if reason is not None:
            self._unreserve(size)
            if promise:
                self._promise(-promise)
            return reason
        return [self._evict(d) for d in victims or ()]

    def _spare(self, victims: list[str]) -> list[str]:
        """The first of *victims* that the quota needs evicted now; the others are let in."""
        excess = 0 if self.max_size is None else self._used() - self.max_size
        needed = []
        for victim in victims:
            if excess > 0:
                needed.append(victim)
                excess -= self._entries[victim]
            else:
                self._let_in(victim)
        return needed

    def _disk_has_room(self, size: int) -> bool:
        space = self.space()
        if space is None:
            return True
        free, margin = space
        unwritten = sum(f.reserved - f.written for f in self._fills.values())
        return free >= size + unwritten + margin

    def space(self) -> tuple[int, int] | None:
        """The bytes free on the cache's file system and the margin kept; None if unknown."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return None
        margin = self.min_free
        if margin is None:
            margin = min(DISK_MARGIN, int(st.f_blocks * st.f_frsize * DISK_MARGIN_SHARE))
        return st.f_bavail * st.f_frsize, margin

    def _victims(self, extra: int = 0) -> list[str] | None:
        """The least recently used blobs to evict to fit the quota and *extra* more bytes,
        or None if none can.

        Blobs being read (by any process), kept for the warm images, or
        filled or evicted by another process are never chosen.  Each victim
        is claimed until it is evicted or let in.
        """
        if self.max_size is None:
            return []
        excess = self._used() + extra - self.max_size
        if excess <= 0:
            return []  # without a look at the index
        victims = []
        for digest, size in self._least_recently_used():
            if digest not in self._kept and digest not in self._fills and self._lock_out(digest):
                victims.append(digest)
                excess -= size
                if excess <= 0:
                    return victims
        for victim in victims:
            self._let_in(victim)
        return None

    def _lock_out(self, digest: str) -> bool:
        """Claim *digest* and keep every reader away from it, unless one reads it now.

        Until :meth:`_let_in`, no other process fills, evicts or starts reading it.
        """
        if digest in self._removing or self._pins[digest] or not self.coordinator.claim(digest):
            return False
        if not self.coordinator.exclude(digest):
            self.coordinator.release(digest)
            return False
        self._removing.add(digest)
        return True

    def _let_in(self, digest: str) -> None:
        self._removing.discard(digest)
        self.coordinator.readmit(digest)
        self.coordinator.release(digest)

    def _least_recently_used(self) -> Iterator[tuple[str, int]]:
        """Cached blobs, least recently used first: here, or by any process sharing the cache.

        The index orders the shared cache; blobs used here since it was last
        written come last, in the order used.  A blob another process cached
        is taken in, to be evicted here.
        """
        if not self.coordinator.shared:
            yield from self._entries.items()
            return
        # Blobs used here since the index was last written, the last ones of our LRU.
        recent = []
        for digest in reversed(self._entries):
            if not self._index.queued(("used", digest)):
                break
            recent.append(digest)
        skip = set(recent)
        # Blobs that another process read lately, which the index may not say yet.
        since = self.reactor.seconds() - RECENT
        elsewhere: list[tuple[float, str]] = []
        for digest in self._index.least_recently_used():
            if digest in skip or not (digest in self._entries or self._adopt(digest, used=False)):
                continue
            read = self.coordinator.last_read(digest)
            if read is not None and read > since:
                elsewhere.append((read, digest))
            else:
                yield digest, self._entries[digest]
        for _, digest in sorted(elsewhere):
            yield digest, self._entries[digest]
        for digest in reversed(recent):
            yield digest, self._entries[digest]

    def _evict(self, digest: str) -> Deferred[None]:
        self.metrics.evictions.inc()
        self.metrics.evicted_bytes.inc(self._entries.get(digest, 0))
        log.info("evicting {digest} to keep within the cache quota", digest=digest)

        def evicted(result: None) -> None:
            self._let_in(digest)

        return self.forget(digest).addCallback(evicted)

    def remove(self, digest: str) -> bool:
        """Remove a blob unless it is being read or filled (for the operator)."""
        if digest in self._fills or digest not in self._entries or not self._lock_out(digest):
            return False
        self.forget(digest).addBoth(lambda _: self._let_in(digest))
        return True

    # --- the blobs kept from eviction -------------------------------------------

    def _remove_kept_leftovers(self) -> None:
        """Remove the temporary files of the blobs kept that a crash mid-write left.

        Another process may be writing one now: only those older than
        :data:`KEPT_TEMP_AGE` go.
        """
        prefix = f".{KEPT_FILE}."
        now = time.time()
        for entry in os.scandir(self.directory):
            if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                try:
                    old = now - entry.stat(follow_symlinks=False).st_mtime > KEPT_TEMP_AGE
                except FileNotFoundError:
                    continue
                if old:
                    log.info("removing {path}, left by a crash", path=entry.path)
                    files.remove(entry.path)

    def keep(self, digests: Iterable[str]) -> None:
        """Keep these blobs from eviction, instead of those kept until now.

        The caller bounds what it keeps (``[warm] max_share``): the rest of
        the quota is left for the LRU.  In a shared directory they are written
        to :data:`~dockmirror.coordination.KEPT_FILE`, for every process to keep.
        """
        self._kept = frozenset(digests)
        if not self.coordinator.shared:
            return
        data = "".join(f"{digest}\n" for digest in sorted(self._kept)).encode()
        temp_path = os.path.join(self.directory, f".{KEPT_FILE}.{uuid.uuid4().hex}")

        def write(_: object) -> Deferred[None]:
            return self._run(files.write_file, temp_path, self._kept_path, data)

        def written(_: object) -> None:
            for hook in self.on_keep:
                hook()

        # One write at a time, so the last one called is the one that stays.
        self._keeping = self._keeping.addCallback(write).addCallbacks(
            written, lambda f: log.failure("writing the blobs kept from eviction", f)
        )

    @property
    def _kept_path(self) -> str:
        return os.path.join(self.directory, KEPT_FILE)

    def reload_kept(self) -> Deferred[None]:
        """Keep the blobs that the process warming the cache wrote it keeps."""
        d = self._run(read_kept, self._kept_path)
        d.addCallbacks(
            self._set_kept, lambda f: log.failure("reading the blobs kept from eviction", f)
        )
        return d

    def _set_kept(self, kept: frozenset[str]) -> None:
        self._kept = kept


def read_kept(path: str) -> frozenset[str]:
    """The well-formed digests of the file of the blobs kept; none if it is missing."""
    try:
        with open(path, "rb") as f:
            data = f.read(KEPT_MAX)
    except FileNotFoundError:
        return frozenset()
    kept = set()
    for line in data.decode("ascii", "replace").splitlines():
        try:
            kept.add(check_digest(line))
        except RegistryError:
            log.warn("ignoring {line!r} in the blobs kept from eviction", line=line[:100])
    return frozenset(kept)
