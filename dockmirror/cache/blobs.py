"""The blob store: verified files named by digest, a quota kept by LRU eviction.

Layout under the cache directory::

    blobs/sha256/ab/abcdef...   one file per digest, no extension
    tmp/                        fills in progress, emptied at start
    index.sqlite                see :mod:`dockmirror.cache.index`
    lock                        held by the process (or the workers) using the directory
    fills.lock                  claims on fills, see :mod:`dockmirror.coordination`

Layers and manifests are both blobs here: stored once by digest, whatever
upstream or repository they came through.  Who may read them is a separate
record, :meth:`BlobStore.allowed`: a digest is served through an upstream
repository only once that repository proved it has it, by its own answer to
a HEAD or GET of the blob.  A manifest's mention proves nothing.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorFDSet,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dockmirror._interfaces import ICoordinator
from dockmirror.cache import files
from dockmirror.cache.fill import Fill
from dockmirror.cache.follow import FollowedFill
from dockmirror.cache.index import Index, Runner, Snapshot
from dockmirror.cache.parts import PREFIX_SUFFIX, RANGED_SUFFIX, RangedFill
from dockmirror.coordination import KEPT_FILE, LocalCoordinator
from dockmirror.errors import RegistryError
from dockmirror.metrics import Metrics
from dockmirror.reference import HEX_LENGTH, check_digest
from dockmirror.streaming import (
    FileSender,
    ShortFile,
    StreamError,
    file_transport,
    release,
)

log = Logger()

#: Bytes read from a file per write to a client ...
CHUNK = 64 << 10
#: ... and chunks written to one client before other work gets a turn.
BURST = 16
#: Free space a fill must leave on the file system, unless ``min_free`` says
#: otherwise: the lesser of this ...
DISK_MARGIN = 256 << 20
#: ... and this share of the file system.
DISK_MARGIN_SHARE = 0.05
#: Digests not cached (yet) whose proofs, and announced sizes, are remembered ...
PROOFS = 1 << 16
#: ... and the upstream repositories remembered per such digest.
PROOFS_PER_DIGEST = 32
#: The most of the file of blobs kept that is read: a million digests.
KEPT_MAX = 100 << 20
#: Seconds after which a temporary file of the blobs kept is a crash's leftover.
KEPT_TEMP_AGE = 60.0
#: Seconds during which a blob read by any process counts as just used, whatever
#: the index says (its use reaches the index within a second or so).
RECENT = 10.0


class BlobGone(FileNotFoundError):
    """The blob was removed (evicted, purged) before this process could pin it."""


class BlobStore:
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

    def __repr__(self) -> str:
        quota = f"/{self.max_size}" if self.max_size is not None else ""
        return (
            f"<BlobStore {self.directory}: {len(self._entries)} blobs, {self.size}{quota} bytes,"
            f" {len(self._fills)} fills>"
        )

    def path(self, digest: str) -> str:
        algorithm, _, hexpart = digest.partition(":")
        return os.path.join(self.blobs_dir, algorithm, hexpart[:2], hexpart)

    # --- start-up ----------------------------------------------------------------

    def recover(self, snapshot: Snapshot) -> None:
        """Check the index against the disk; blocking, before the mirror listens.

        Temporary files are removed; a file the index does not know is adopted
        (files only get their names once verified); a row without its file, or
        whose file has the wrong size, goes.
        """
        files.make_directory(self.blobs_dir)
        files.make_directory(self.temp_dir)
        self._remove_kept_leftovers()
        temporary = 0
        for entry in os.scandir(self.temp_dir):
            # Another worker's fill in progress stays.
            if not self.coordinator.held_elsewhere(entry.name.partition(".")[0]):
                files.remove(entry.path)
                temporary += 1
        rows = {digest: (size, used) for digest, size, used in snapshot.blobs}
        found: list[tuple[float, str, int]] = []
        for digest, size, mtime in self._scan():
            row = rows.pop(digest, None)
            if row is None:
                found.append((mtime, digest, size))
                self._index.write(
                    "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)", digest, size, mtime
                )
            elif row[0] != size:
                log.warn(
                    "cached {digest} is {size} bytes, not {expected}: removed",
                    digest=digest,
                    size=size,
                    expected=row[0],
                )
                files.remove(self.path(digest))
                self._index.write("DELETE FROM blobs WHERE digest = ?", digest)
            else:
                found.append((row[1], digest, size))
        self._index.write_many("DELETE FROM blobs WHERE digest = ?", ((d,) for d in rows))
        self._index.write("DELETE FROM manifests WHERE digest NOT IN (SELECT digest FROM blobs)")
        self._index.write("DELETE FROM access WHERE digest NOT IN (SELECT digest FROM blobs)")
        for _, digest, size in sorted(found):
            self._entries[digest] = size
            self.size += size
        self.coordinator.start_usage(self.size)
        if self.coordinator.shared:
            self._kept = _read_kept(self._kept_path)
        for origin, digest in snapshot.access:
            if digest in self._entries:
                self._access.setdefault(digest, set()).add(sys.intern(origin))
        for digest in self._victims() or []:
            self._evict(digest)
        self.metrics.cache_size.set(self.size)
        log.info(
            "cache {directory}: {count} blobs, {size} bytes; {temporary} unfinished fills removed",
            directory=self.directory,
            count=len(self._entries),
            size=self.size,
            temporary=temporary,
        )

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

    def _scan(self) -> Iterable[tuple[str, int, float]]:
        """Every well-named blob file as (digest, size, mtime); strays are removed.

        Files and directories that an earlier version left readable by
        everyone are made 0640 and 0750.
        """
        for algorithm in _subdirectories(self.blobs_dir):
            length = HEX_LENGTH.get(algorithm.name)
            files.restrict(algorithm.path, files.DIRECTORY_MODE)
            for shard in _subdirectories(algorithm.path):
                files.restrict(shard.path, files.DIRECTORY_MODE)
                for entry in os.scandir(shard.path):
                    name = entry.name
                    if (
                        length == len(name)
                        and name.startswith(shard.name)
                        and entry.is_file(follow_symlinks=False)
                        and all(c in "0123456789abcdef" for c in name)
                    ):
                        st = entry.stat(follow_symlinks=False)
                        if st.st_mode & 0o777 & ~files.FILE_MODE:
                            files.restrict(entry.path, files.FILE_MODE)
                        yield f"{algorithm.name}:{name}", st.st_size, st.st_mtime
                    else:
                        log.warn("removing stray file {path} from the cache", path=entry.path)
                        files.remove(entry.path)

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

    # --- reading -----------------------------------------------------------------

    def reader(
        self, digest: str, start: int, end: int, on_bytes: Callable[[int], None]
    ) -> BlobReader:
        """A producer of bytes [start, end) of a cached blob or of one being filled.

        The blob is pinned before its file is opened, so a process evicting
        it either sees the pin or has it refused.  Raises :class:`BlobGone`
        when it was removed (then it is forgotten) or another process is
        removing it, and ``OSError`` when the file cannot be opened.
        """
        fill = self.filling(digest)
        if not self._pin(digest):
            raise BlobGone(errno.ENOENT, f"{digest} is being removed")
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            try:
                fd = os.open(fill.temp_path if fill is not None else self.path(digest), flags)
            except FileNotFoundError:
                if fill is None:
                    raise
                # The fill is being renamed into place just now.
                fd = os.open(self.path(digest), flags)
        except FileNotFoundError as e:
            self.unpin(digest)
            if fill is None:
                log.warn("cached {digest} is gone from the disk", digest=digest)
                self.forget(digest)
            raise BlobGone(e.errno, f"{digest} was removed") from e
        except OSError:
            self.unpin(digest)
            raise
        return BlobReader(self, digest, fd, start, end, fill, on_bytes)

    def _pin(self, digest: str) -> bool:
        """Count a reader of *digest*; False if another process is removing it."""
        if not self._pins[digest] and not self.coordinator.pin(digest):
            return False
        self._pins[digest] += 1
        return True

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
        d = self._run(_read_kept, self._kept_path)
        d.addCallbacks(
            self._set_kept, lambda f: log.failure("reading the blobs kept from eviction", f)
        )
        return d

    def _set_kept(self, kept: frozenset[str]) -> None:
        self._kept = kept

    def unpin(self, digest: str) -> None:
        self._pins[digest] -= 1
        if self._pins[digest] <= 0:
            del self._pins[digest]
            self.coordinator.unpin(digest)

    def read_small(self, digest: str) -> bytes | None:
        """The whole of a small cached blob (a manifest), or None.

        Raises ``OSError`` for an error other than the file being gone
        (EMFILE, EIO, ...): the blob is kept for when it passes.
        """
        if digest not in self._entries:
            return None
        try:
            with open(self.path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            log.warn("cached {digest} is gone from the disk", digest=digest)
            self.forget(digest)
            return None
        if len(data) != self._entries[digest]:
            log.warn("cached {digest} has the wrong size: removed", digest=digest)
            self.forget(digest)
            return None
        self.touch(digest)
        return data

    # --- writing -----------------------------------------------------------------

    def begin_fill(
        self, digest: str, size: int, upstream: str, parts: int = 1
    ) -> Fill | FollowedFill | str:
        """Reserve room for a blob and register its fill, or say why it won't be cached.

        With *parts* above 1, the fill is a :class:`RangedFill`, fetched in
        ranges over that many connections.  When another process sharing the
        directory fills the blob, or just did, the fill returned follows that
        process's work.
        """
        if self.max_size is not None and size > self.max_size:
            return "larger than the cache"
        if not self.coordinator.claim(digest):
            log.info("following the fill of {digest} by another worker", digest=digest)
            return self._follow(digest, size)
        if self._adopt(digest):
            self.coordinator.release(digest)
            return self._follow(digest, size)
        evictions = self._make_room(size)
        if isinstance(evictions, str):
            self.coordinator.release(digest)
            return evictions
        temp_path = os.path.join(self.temp_dir, f"{digest.partition(':')[2]}.{uuid.uuid4().hex}")
        fill: Fill
        if parts > 1:
            temp_path += RANGED_SUFFIX
            fill = RangedFill(
                self,
                digest,
                size,
                upstream,
                temp_path,
                evictions,
                self.reactor,
                self._run,
                parts=parts,
            )
        else:
            fill = Fill(self, digest, size, upstream, temp_path, evictions, self.reactor, self._run)
        self._fills[digest] = fill
        self.metrics.fills_in_flight.inc()
        return fill

    def _make_room(self, size: int) -> list[Deferred[None]] | str:
        """Reserve *size* bytes and evict what must go for them; or say why there is no room.

        The reservation comes first, so that a process choosing its victims
        at the same time counts it, and each victim is claimed, so that no
        two processes count one victim's bytes as freed for themselves.
        """
        self.reserved += size
        self._reserve(size)
        victims = self._victims()
        reason = None
        if victims is None:
            reason = "cache full of blobs in use"
        elif not self._disk_has_room(size - sum(self._entries[d] for d in victims)):
            reason = "disk full"
            for victim in victims:
                self._let_in(victim)
        if reason is not None:
            self._unreserve(size)
            return reason
        return [self._evict(d) for d in victims or ()]

    def follow(self, digest: str, size: int) -> FollowedFill | None:
        """Follow the fill of *digest* that another process sharing the directory runs.

        None if no other process holds its claim (it ended, or never began).
        """
        followed = self._followed.get(digest)
        if followed is not None:
            return followed
        if digest in self._fills or not self.coordinator.held_elsewhere(digest):
            return None
        return self._follow(digest, size)

    def _follow(self, digest: str, size: int) -> FollowedFill:
        followed = self._followed[digest] = FollowedFill(
            digest,
            size,
            self.path(digest),
            lambda: self._temporary_file(digest),
            self.coordinator,
            self.reactor,
            self._unfollow,
        )
        followed.start()
        return followed

    def _temporary_file(self, digest: str) -> str | None:
        """The newest temporary file of *digest*, made by whichever process fills it."""
        prefix = digest.partition(":")[2] + "."
        found = [
            (entry.stat().st_mtime_ns, entry.path)
            for entry in os.scandir(self.temp_dir)
            if entry.name.startswith(prefix) and not entry.name.endswith(PREFIX_SUFFIX)
        ]
        return max(found)[1] if found else None

    def _fills_elsewhere(self) -> dict[str, int]:
        """Bytes written so far by the fills that other workers run, by digest."""
        if not self.coordinator.shared:
            return {}
        fills = {}
        for entry in os.scandir(self.temp_dir):
            hexpart = entry.name.partition(".")[0]
            if entry.name.endswith(PREFIX_SUFFIX):
                continue
            if self.coordinator.held_elsewhere(hexpart) and hexpart not in fills:
                try:
                    fills[hexpart] = entry.stat().st_size
                except FileNotFoundError:
                    continue
        algorithms = {length: name for name, length in HEX_LENGTH.items()}
        return {f"{algorithms.get(len(h), '?')}:{h}": n for h, n in fills.items()}

    def _unfollow(self, followed: FollowedFill) -> None:
        if self._followed.get(followed.digest) is followed:
            del self._followed[followed.digest]
        if followed.committed:
            self._add(followed.digest, followed.size)

    def committed(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            self._hold(fill.size)  # before the reservation ends: never counted short
            self._reserve(-fill.size)
        # Recorded before the claim ends: whoever claims it next learns it is here.
        self._add(fill.digest, fill.size)
        self._end_fill(fill)

    def failed(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            self._reserve(-fill.size)
        self._end_fill(fill)
        # The size may have been wrong: the next request asks the upstream again.
        self.doubt(fill.digest)

    def _end_fill(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]
            self.coordinator.release(fill.digest)
            self.reserved -= fill.size
            self.metrics.fills_in_flight.dec()

    async def put_small(self, digest: str, data: bytes) -> bool:
        """Store a small, already verified blob (a manifest); False if there is no room."""
        if self.has(digest):
            self.touch(digest)
            return True
        if isinstance(self._make_room(len(data)), str):
            return False
        temp_path = os.path.join(self.temp_dir, f"{digest.partition(':')[2]}.{uuid.uuid4().hex}")
        try:
            await self._run(files.write_file, temp_path, self.path(digest), data)
        except OSError as e:
            log.warn("cannot cache {digest}: {error}", digest=digest, error=e.strerror)
            return False
        else:
            self._hold(len(data))
        finally:
            self._unreserve(len(data))
        self._add(digest, len(data))
        return True

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

    def _disk_has_room(self, size: int) -> bool:
        space = self.space()
        if space is None:
            return True
        free, margin = space
        unwritten = sum(f.size - f.written for f in self._fills.values())
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

    # --- removal -----------------------------------------------------------------

    def _victims(self) -> list[str] | None:
        """The least recently used blobs to evict to fit the quota, or None if none can.

        Blobs being read (by any process), kept for the warm images, or
        filled or evicted by another process are never chosen.  Each victim
        is claimed until it is evicted.
        """
        if self.max_size is None:
            return []
        excess = self._used() - self.max_size
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
        d = self._run(files.remove, self.path(digest))

        def removed(gone: bool) -> None:
            if gone:  # by us: another worker may have removed it first
                self._hold(-size)

        d.addCallbacks(removed, lambda f: log.failure("removing cached {digest}", f, digest=digest))
        return d

    def _used(self) -> int:
        """Bytes held and reserved, by this process or by all that share the directory."""
        if self.coordinator.shared:
            return self.coordinator.add_usage(0)
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

    def remove(self, digest: str) -> bool:
        """Remove a blob unless it is being read or filled (for the operator)."""
        if digest in self._fills or digest not in self._entries or not self._lock_out(digest):
            return False
        self.forget(digest).addBoth(lambda _: self._let_in(digest))
        return True

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

    async def stop(self, grace: float) -> None:
        """Give the fills in progress *grace* seconds to finish, then abandon the rest.

        An abandoned fill commits nothing; its temporary file goes at the next start.
        """
        waits = [fill.finished.wait() for fill in self._fills.values()]
        if waits:
            log.info("waiting up to {grace}s for {n} fills", grace=grace, n=len(waits))
            everything = DeferredList(waits, consumeErrors=True)
            everything.addTimeout(grace, self.reactor)
            try:
                await everything
            except defer.TimeoutError:
                pass
        fills: list[Fill | FollowedFill] = [*self._fills.values(), *self._followed.values()]
        for fill in fills:
            fill.abandon(StreamError("the mirror is stopping"))

    def stats(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "size": self.size,
            "max_size": self.max_size,
            "reserved": self.reserved,
            "blobs": len(self._entries),
            "readers": sum(self._pins.values()),
            "kept": len(self._kept),
            "fills": {d: f"{f.written}/{f.size}" for d, f in self._fills.items()},
            "elsewhere": self._fills_elsewhere(),
        }


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
        if self.done.called:  # cancelled, which stopped the sender
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
        if self._fd is None:
            return
        if self._sender is not None and not self._sender.done.called:
            self._sender.done.cancel()  # before its file is closed
        os.close(self._fd)
        self._fd = None
        self._store.unpin(self.digest)
        if self._later is not None and self._later.active():
            self._later.cancel()
        if self._fill is not None:
            self._fill.unsubscribe(self._pump)
            self._fill.unsubscribe(self._grown)
        if self._consumer is not None:
            release(self._consumer)
            self._consumer = None


def _read_kept(path: str) -> frozenset[str]:
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


def _subdirectories(path: str) -> list[os.DirEntry[str]]:
    return [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
