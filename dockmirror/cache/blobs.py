"""The blob store: verified files named by digest, a quota kept by LRU eviction.

Layout under the cache directory::

    blobs/sha256/ab/abcdef...   one file per digest, no extension
    tmp/                        fills in progress, emptied at start
    index.sqlite                see :mod:`dockmirror.cache.index`
    lock                        held by the process (or the workers) using the directory
    fills.lock                  claims on fills, see :mod:`dockmirror.coordination`

Layers and manifests are both blobs here: stored once by digest, whatever
upstream or repository they came through.  The store is built in layers:
:mod:`~dockmirror.cache.entries` (what is cached, and for whom),
:mod:`~dockmirror.cache.eviction` (the quota and the LRU), and here its
start-up, fills and readers (:mod:`~dockmirror.cache.reader`).
"""

from __future__ import annotations

import errno
import os
import sys
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import DeferredList
from twisted.logger import Logger

from dockmirror.cache import files
from dockmirror.cache.eviction import EvictingStore, read_kept
from dockmirror.cache.fill import Fill
from dockmirror.cache.follow import FollowedFill
from dockmirror.cache.index import Snapshot
from dockmirror.cache.parts import PREFIX_SUFFIX, RANGED_SUFFIX, RangedFill
from dockmirror.cache.reader import BlobReader
from dockmirror.reference import HEX_LENGTH
from dockmirror.streaming import (
    StreamError,
)

log = Logger()


class BlobGone(FileNotFoundError):
    """The blob was removed (evicted, purged) before this process could pin it."""


class BlobStore(EvictingStore):
    """The blob store: its start-up, its fills and its readers, on its entries and quota."""

    def __repr__(self) -> str:
        quota = f"/{self.max_size}" if self.max_size is not None else ""
        return (
            f"<BlobStore {self.directory}: {len(self._entries)} blobs, {self.size}{quota} bytes,"
            f" {len(self._fills)} fills>"
        )

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
            self._kept = read_kept(self._kept_path)
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
        """Reserve room for a blob's first bytes and register its fill, or say why it won't
        be cached.

        The fill reserves the rest as it arrives (:meth:`grow`); the disk
        must have room for the whole *size* at the start.  With *parts*
        above 1, the fill is a :class:`RangedFill`, fetched in ranges over
        that many connections.  When another process sharing the
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
        reserved = min(size, self.reserve_step)
        evictions = self._make_room(reserved, disk=size, promise=size - reserved)
        if isinstance(evictions, str):
            self.coordinator.release(digest)
            return evictions
        temp_path = os.path.join(self.temp_dir, f"{digest.partition(':')[2]}.{uuid.uuid4().hex}")
        if parts > 1:
            temp_path += RANGED_SUFFIX
        args = (
            self,
            digest,
            size,
            upstream,
            temp_path,
            reserved,
            evictions,
            self.reactor,
            self._run,
        )
        fill = RangedFill(*args, parts=parts) if parts > 1 else Fill(*args)
        self._fills[digest] = fill
        self.metrics.fills_in_flight.inc()
        return fill

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
            self._reserve(-fill.reserved)
        # Recorded before the claim ends: whoever claims it next learns it is here.
        self._add(fill.digest, fill.size)
        self._end_fill(fill)

    def failed(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            self._reserve(-fill.reserved)
        self._end_fill(fill)
        # The size may have been wrong: the next request asks the upstream again.
        self.doubt(fill.digest)

    def _end_fill(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]
            self.coordinator.release(fill.digest)
            self.reserved -= fill.reserved
            if fill.reserved < fill.size:
                self._promise(fill.reserved - fill.size)
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
            "promised": self.promised,
            "blobs": len(self._entries),
            "readers": sum(self._pins.values()),
            "kept": len(self._kept),
            "fills": {
                d: f"{f.written}/{f.size}, {f.reserved} reserved" for d, f in self._fills.items()
            },
            "elsewhere": self._fills_elsewhere(),
        }


def _subdirectories(path: str) -> list[os.DirEntry[str]]:
    return [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
