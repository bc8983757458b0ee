"""The cache's SQLite index: read whole at start, written behind from one thread.

Everything the index holds can be lost without harm: blob files are adopted
from disk, and a lost access record or tag costs one upstream request.  So
writes are queued and applied in batches, off the reactor thread, and a
damaged or foreign database file is set aside and started afresh.

Workers sharing the cache share its index: the last use of a blob by any of
them is its ``used`` time, which :meth:`Index.least_recently_used` reads for
eviction, on an index lookup of its own connection.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from dockmirror.cache import files

log = Logger()

SCHEMA_VERSION = 5
#: Seconds between a change and the batch that writes it.
FLUSH_DELAY = 1.0
#: Rows read at a time by :meth:`Index.least_recently_used`.
LRU_BATCH = 256

#: Runs a blocking callable in a worker thread: ``run(f, *args) -> Deferred``.
Runner = Callable[..., "Deferred[Any]"]

Statement = tuple[str, tuple[Any, ...]]


@dataclass
class Snapshot:
    """The rows of the index, as loaded at start."""

    blobs: list[tuple[str, int, float]] = field(default_factory=list)
    manifests: list[tuple[str, str]] = field(default_factory=list)
    access: list[tuple[str, str]] = field(default_factory=list)
    tags: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    #: The objects of the shared storage tier (digest, size, used), for its quota.
    objects: list[tuple[str, int, float]] = field(default_factory=list)
    #: The id of the last of the cluster's purges applied here, and when they were read
    #: (0, 0.0: never); read before the rest, which reflects at least those purges.
    purges: tuple[int, float] = (0, 0.0)


class Index:
    def __init__(self, path: str, reactor: IReactorTime, run: Runner) -> None:
        self.path = path
        self._reactor = reactor
        self._run = run
        self._db: sqlite3.Connection | None = None
        #: Reads on the reactor thread (the writer's connection is its thread's).
        self._reader: sqlite3.Connection | None = None
        self._queue: list[Statement] = []
        self._keyed: dict[object, int] = {}
        self._timer: IDelayedCall | None = None
        self._flushing: Deferred[None] | None = None

    def __repr__(self) -> str:
        return f"<Index {self.path} ({len(self._queue)} writes queued)>"

    def load(self) -> Snapshot:
        """Open (or create) the database and read every row; blocking, for start-up."""
        try:
            return self._load()
        except sqlite3.DatabaseError as e:
            self._close_connections()
            aside = f"{self.path}.unusable-{int(time.time())}"
            log.warn(
                "cache index {path} is unusable ({error}); moved to {aside}, starting afresh",
                path=self.path,
                error=str(e),
                aside=aside,
            )
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.remove(self.path + suffix)
            return self._load()

    def _load(self) -> Snapshot:
        self._close_connections()
        # Made here so that it, and SQLite's journals after it, get the cache's mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, files.FILE_MODE))
        files.restrict(self.path, files.FILE_MODE)
        db = self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            db.executescript(
                "BEGIN;"
                + resources.files("dockmirror.cache").joinpath("schema.sql").read_text()
                + "COMMIT;"
            )
        (version,) = db.execute("SELECT version FROM version").fetchone()
        while version < SCHEMA_VERSION:
            upgrade = f"upgrade-{version}.sql"
            log.info("upgrading cache index {path} with {upgrade}", path=self.path, upgrade=upgrade)
            db.executescript(
                "BEGIN;"
                + resources.files("dockmirror.cache").joinpath(upgrade).read_text()
                + "COMMIT;"
            )
            (version,) = db.execute("SELECT version FROM version").fetchone()
        if version != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA busy_timeout = 1000")
        self._reader.execute("PRAGMA query_only = ON")
        purges = db.execute("SELECT applied, polled FROM cluster_purges").fetchone()
        return Snapshot(
            purges=(int(purges[0]), float(purges[1])) if purges else (0, 0.0),
            blobs=db.execute("SELECT digest, size, used FROM blobs").fetchall(),
            manifests=db.execute("SELECT digest, media_type FROM manifests").fetchall(),
            access=db.execute("SELECT origin, digest FROM access").fetchall(),
            tags=db.execute("SELECT origin, tag, media_type, digest, checked FROM tags").fetchall(),
            objects=db.execute("SELECT digest, size, used FROM storage_objects").fetchall(),
        )

    def write(self, sql: str, *params: Any, key: object = None) -> None:
        """Queue one statement for the next batch.

        A statement with a *key* replaces a queued one with the same key, so
        frequent updates of one row (access times) cost one write per batch.
        """
        if key is not None and key in self._keyed:
            self._queue[self._keyed[key]] = (sql, params)
            return
        if key is not None:
            self._keyed[key] = len(self._queue)
        self._queue.append((sql, params))
        if self._timer is None and self._flushing is None:
            self._timer = self._reactor.callLater(FLUSH_DELAY, self.flush)

    def least_recently_used(self) -> Iterator[str]:
        """Every blob indexed, least recently used by any process first.

        Uses not written yet (by any process) are not seen: :meth:`queued`
        tells this process's own.
        """
        if self._reader is None:
            return
        after: tuple[float, str] = (float("-inf"), "")
        while True:
            rows = self._reader.execute(
                "SELECT digest, used FROM blobs WHERE (used, digest) > (?, ?)"
                " ORDER BY used, digest LIMIT ?",
                (*after, LRU_BATCH),
            ).fetchall()
            for digest, _ in rows:
                yield digest
            if len(rows) < LRU_BATCH:
                return
            after = (rows[-1][1], rows[-1][0])

    def queued(self, key: object) -> bool:
        """Whether a statement written with *key* waits for its batch."""
        return key in self._keyed

    def write_many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        for row in rows:
            self.write(sql, *row)

    def flush(self) -> Deferred[None]:
        """Apply the queued statements in one transaction; fires when they are written."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        done: Deferred[None] = Deferred()
        if self._flushing is not None:
            # One batch at a time: the next one starts when this one ends.
            self._flushing.addBoth(_passing(lambda: self.flush().chainDeferred(done)))
        elif not self._queue or self._db is None:
            done.callback(None)
        else:
            batch, self._queue = self._queue, []
            self._keyed = {}
            self._flushing = flushing = self._run(self._apply, self._db, batch)
            flushing.addErrback(lambda f: log.failure("writing the cache index failed", f))
            flushing.addBoth(self._flushed)
            flushing.addBoth(_passing(lambda: done.callback(None)))
        return done

    def _flushed(self, _: object) -> None:
        self._flushing = None
        if self._queue and self._timer is None:
            self._timer = self._reactor.callLater(FLUSH_DELAY, self.flush)

    @staticmethod
    def _apply(db: sqlite3.Connection, batch: list[Statement]) -> None:
        db.execute("BEGIN")
        try:
            for sql, params in batch:
                db.execute(sql, params)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> Deferred[None]:
        """Write what is queued, then close the database."""

        return self.flush().addBoth(lambda _: self._close_connections())

    def _close_connections(self) -> None:
        for db in (self._db, self._reader):
            if db is not None:
                db.close()
        self._db = self._reader = None


def _passing(f: Callable[[], object]) -> Callable[[Any], Any]:
    """A callback that calls *f* and passes its input on unchanged."""

    def callback(result: Any) -> Any:
        f()
        return result

    return callback
