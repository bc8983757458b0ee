"""The key store in SQLite.

:class:`KeyDatabase` is the synchronous store over a single connection; the
``dockmirror-admin`` command uses it as it is, even while the server runs (WAL
mode lets one writer and many readers share the file).  :class:`SQLiteKeys`
is the server's backend around it: every query runs on one dedicated thread.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from dockmirror.auth.keys import KeyStoreError
from dockmirror.auth.queries import KeyQueries, Row
from dockmirror.auth.secretfile import make_private_directory
from dockmirror.sqlite import BUSY_TIMEOUT_MS, write_transaction

log = Logger()

T = TypeVar("T")

SCHEMA_VERSION = 2


def _sql(name: str) -> str:
    return resources.files("dockmirror.auth").joinpath(name).read_text()


class KeyDatabase(KeyQueries):
    """The key store over one SQLite connection.

    The connection may be handed to another thread once opened, as long as
    one thread at a time uses it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
    ) -> None:
        """*read_only* opens a database on a read-only file system: it can verify, not write."""
        super().__init__(clock)
        self.path = Path(path)
        self.read_only = read_only
        if read_only:
            self._conn = self._connect(f"file:{quote(str(self.path))}?immutable=1", uri=True)
            try:
                self._migrate(create=False)
            except (sqlite3.Error, KeyStoreError) as e:
                self._conn.close()
                raise KeyStoreError(f"{self.path}: {e}") from None
            return
        if not self.path.exists():
            if not create:
                raise KeyStoreError(
                    f"{self.path}: no key database (dockmirror creates it when it starts)"
                )
            make_private_directory(self.path.parent)
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
        self._conn = self._connect(self.path)
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.Error as e:
            self._conn.close()
            raise KeyStoreError(f"{self.path}: {e}") from None
        except KeyStoreError:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"<KeyDatabase {self.path}>"

    def _connect(self, target: str | Path, uri: bool = False) -> sqlite3.Connection:
        try:
            return sqlite3.connect(
                target,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
                uri=uri,
            )
        except sqlite3.Error as e:
            raise KeyStoreError(f"{self.path}: cannot open: {e}") from None

    def _migrate(self, create: bool = True) -> None:
        known = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'version'"
        ).fetchone()
        if not known and not create:
            raise KeyStoreError("not a key database")
        if not known:
            self._conn.executescript(_sql("schema.sql"))
        (version,) = self._conn.execute("SELECT version FROM version").fetchone()
        if version == 1:
            self._upgrade_from_1()
            (version,) = self._conn.execute("SELECT version FROM version").fetchone()
        if version != SCHEMA_VERSION:
            raise KeyStoreError(
                f"{self.path}: key database schema version {version};"
                f" this dockmirror knows version {SCHEMA_VERSION}"
            )

    def _upgrade_from_1(self) -> None:
        """Version 1 to 2, once, even with two processes starting at the same time."""
        with self._transaction():
            (version,) = self._conn.execute("SELECT version FROM version").fetchone()
            if version == 1:
                for statement in _sql("upgrade-2.sql").split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                log.info("upgraded the key database {path} to schema 2", path=str(self.path))

    def close(self) -> None:
        self._conn.close()

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, args).fetchall()

    def _run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with write_transaction(self._conn):
            yield


def _open(path: Path) -> tuple[KeyDatabase, frozenset[str]] | str:
    """The database at *path* and its revoked appIds, or why it cannot be opened.

    On a read-only file system (SQLite cannot make its WAL files there) the
    database is opened read-only, so that keys keep working.
    """
    try:
        db = KeyDatabase(path, read_only=_on_read_only_file_system(path))
    except KeyStoreError as e:
        return str(e)
    except OSError as e:
        return f"{path}: {e.strerror}"
    try:
        return db, db.revoked_ids()
    except sqlite3.Error as e:
        db.close()
        return f"{path}: {e}"


def _on_read_only_file_system(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY) and path.exists()
    except OSError:
        return False


class SQLiteKeys:
    """The key store of one node: an SQLite file, one connection, one thread."""

    shared = False

    def __init__(self, path: str | Path, reactor: Any) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.read_only = False
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="dockmirror-keystore")
        self._db: KeyDatabase | None = None

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def open(self) -> frozenset[str] | str:
        result = _open(self.path)
        if isinstance(result, str):
            return result
        self._db, revoked = result
        self.read_only = self._db.read_only
        return revoked

    async def in_thread(self, f: Callable[[], T]) -> T:
        result: T = await deferToThreadPool(self._reactor, self._pool, f)
        return result

    async def run(self, f: Callable[[KeyQueries], T]) -> T:
        db = self._db
        assert db is not None, "the key store is not open"
        try:
            result: T = await deferToThreadPool(self._reactor, self._pool, f, db)
        except sqlite3.Error as e:
            raise KeyStoreError(f"{self.path}: {e}") from e
        return result

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
