"""The API-key store, in SQLite.

:class:`KeyDatabase` is the synchronous store over a single connection; the
``dockmirror-admin`` command uses it as it is, even while the server runs (WAL
mode lets one writer and many readers share the file).  :class:`KeyStore` is
the server's service around it: every query runs on one dedicated thread, and
usage counters are added up in memory and written in batches.

Only an HMAC-SHA256 of each apiKey, under a random per-key salt, is stored.
An apiKey carries 256 random bits, so a fast hash is as good as a slow one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import string
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from dockmirror._interfaces import INotifier
from dockmirror.auth.secretfile import make_private_directory
from dockmirror.sqlite import BUSY_TIMEOUT_MS, write_transaction

log = Logger()

T = TypeVar("T")

SCHEMA_VERSION = 2
#: The owner of keys made by ``dockmirror-admin`` and the manhole.
OPERATOR = "operator"
#: Days of per-key daily usage kept (the portal charts 30).
USAGE_DAYS = 31
#: Hours of request counts kept (the portal charts 24).
TRAFFIC_HOURS = 48
APP_ID_PREFIX = "app_"
API_KEY_PREFIX = "sk_"
_APP_ID_ALPHABET = string.ascii_lowercase + string.digits
_APP_ID_LENGTH = 20  # 103 random bits: unguessable, though not a secret
_SECRET_BYTES = 32
_SALT_BYTES = 16
#: Credentials longer than this are refused before any hashing.
MAX_CREDENTIAL_LENGTH = 256
NAME_MAX = 100
DAY = 86400
HOUR = 3600
#: Seconds between writes of the usage counters.
FLUSH_INTERVAL = 5.0

_COLUMNS = (
    "app_id, name, created_at, revoked_at, last_used_at,"
    " use_count, bytes_served, repositories, replaced_by, owner"
)


class KeyStoreError(Exception):
    """A key-store operation cannot be done; the message says why."""


#: ``(appId, day, requests, bytes)``, the day counted from the epoch.
DailyUsage = tuple[str, int, int, int]


class QuotaExceeded(KeyStoreError):
    """The owner already has as many live keys as allowed."""


def iso_time(timestamp: float) -> str:
    """``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(timestamp: int | None) -> str | None:
    return iso_time(timestamp) if timestamp is not None else None


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _hash(salt: bytes, api_key: str) -> bytes:
    return hmac.new(salt, api_key.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


@dataclass(frozen=True)
class KeyInfo:
    """One key as listed: never its secret."""

    app_id: str
    name: str
    created_at: int
    revoked_at: int | None
    last_used_at: int | None
    use_count: int
    bytes_served: int
    #: ``UPSTREAM/PREFIX`` rules this key may pull from; None: everything.
    repositories: tuple[str, ...] | None
    replaced_by: str | None
    #: A portal identity (``github:octocat``), or :data:`OPERATOR`.
    owner: str = OPERATOR

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "appId": self.app_id,
            "name": self.name,
            "owner": self.owner,
            "createdAt": _iso(self.created_at),
            "lastUsedAt": _iso(self.last_used_at),
            "useCount": self.use_count,
            "bytesServed": self.bytes_served,
            "revoked": self.revoked,
            "revokedAt": _iso(self.revoked_at),
            "replacedBy": self.replaced_by,
            "repositories": list(self.repositories) if self.repositories is not None else None,
        }

    def __repr__(self) -> str:
        state = f"revoked {_iso(self.revoked_at)}" if self.revoked else "active"
        scope = "" if self.repositories is None else f" only {','.join(self.repositories)}"
        owner = "" if self.owner == OPERATOR else f" of {self.owner}"
        return (
            f"<key {self.app_id} {self.name!r}{owner} {state}{scope}: {self.use_count} requests,"
            f" {_size(self.bytes_served)}, last used {_iso(self.last_used_at) or 'never'}>"
        )


class KeyList(list[KeyInfo]):
    """Keys, shown as a table at the manhole prompt."""

    def __repr__(self) -> str:
        lines = [f"{len(self)} keys"]
        lines.extend(repr(key) for key in self)
        return "\n".join(lines)


@dataclass(frozen=True)
class NewKey:
    """A key just made: the only time its apiKey is known."""

    app_id: str
    api_key: str
    name: str

    def to_json(self) -> dict[str, str]:
        return {"appId": self.app_id, "apiKey": self.api_key}

    def __repr__(self) -> str:
        return f"<new key {self.name!r}: appId {self.app_id} apiKey {self.api_key}>"


def _sql(name: str) -> str:
    return resources.files("dockmirror.auth").joinpath(name).read_text()


@dataclass
class Usage:
    """Usage of one key not yet written to the database."""

    requests: int = 0
    bytes: int = 0
    last_used: int = 0

    def add(self, requests: int, nbytes: int, last_used: int) -> None:
        self.requests += requests
        self.bytes += nbytes
        self.last_used = max(self.last_used, last_used)


def _check_name(name: str) -> str:
    if not name.strip() or len(name) > NAME_MAX or not name.isprintable():
        raise ValueError(f"a key name is 1 to {NAME_MAX} printable characters")
    return name


def _info(row: Sequence[Any]) -> KeyInfo:
    repositories = json.loads(row[7]) if row[7] is not None else None
    return KeyInfo(
        app_id=row[0],
        name=row[1],
        created_at=row[2],
        revoked_at=row[3],
        last_used_at=row[4],
        use_count=row[5],
        bytes_served=row[6],
        repositories=tuple(repositories) if repositories is not None else None,
        replaced_by=row[8],
        owner=row[9],
    )


#: One row of a key store as :meth:`KeyQueries.export` gives it, every column.
Row = tuple[Any, ...]
#: The table of keys, then the daily usage, then the hourly traffic.
KeyDump = tuple[list[Row], list[Row], list[Row]]
_ALL_KEY_COLUMNS = (
    "app_id, name, salt, secret_hash, repositories, created_at, revoked_at,"
    " replaced_by, last_used_at, use_count, bytes_served, owner"
)


class KeyQueries:
    """What the key store does, in SQL that SQLite and PostgreSQL both speak.

    A subclass gives the connection: how a statement runs (:meth:`_rows`,
    :meth:`_run_many`), what a write transaction is (:meth:`_transaction`,
    which serializes writers), and the few words the two dialects spell
    differently.  Statements use ``?`` placeholders.
    """

    #: The SQL function giving the larger of two values.
    _greatest = "max"

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Run one statement; its rows."""
        raise NotImplementedError

    def _run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per row of arguments."""
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[None]:
        """A write transaction: one writer at a time, whatever the process."""
        raise NotImplementedError

    def _announce_revoked(self, app_ids: Sequence[str]) -> None:
        """Tell the servers sharing this store, when it commits, that *app_ids* are revoked.

        Servers reload the revoked keys every :data:`FLUSH_INTERVAL` anyway;
        a store that can announce (PostgreSQL) makes it at once.
        """

    def _row(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _now(self) -> int:
        return int(self._clock())

    def _get(self, app_id: str) -> KeyInfo:
        row = self._row(f"SELECT {_COLUMNS} FROM keys WHERE app_id = ?", (app_id,))
        if row is None:
            raise KeyStoreError(f"no key {app_id}")
        return _info(row)

    def _insert(
        self, name: str, repositories: Sequence[str] | None, owner: str = OPERATOR
    ) -> NewKey:
        app_id = APP_ID_PREFIX + "".join(
            secrets.choice(_APP_ID_ALPHABET) for _ in range(_APP_ID_LENGTH)
        )
        api_key = API_KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        salt = secrets.token_bytes(_SALT_BYTES)
        self._rows(
            "INSERT INTO keys (app_id, name, salt, secret_hash, repositories, created_at, owner)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                app_id,
                name,
                salt,
                _hash(salt, api_key),
                json.dumps(list(repositories)) if repositories is not None else None,
                self._now(),
                owner,
            ),
        )
        return NewKey(app_id, api_key, name)

    def create(
        self,
        name: str,
        repositories: Sequence[str] | None = None,
        owner: str = OPERATOR,
        max_live: int | None = None,
    ) -> NewKey:
        """Make a key; *repositories* limits it to those ``UPSTREAM/PREFIX`` rules.

        With *max_live*, refuses (:class:`QuotaExceeded`) when *owner* already
        has that many keys not revoked.
        """
        _check_name(name)
        with self._transaction():
            if max_live is not None:
                (live,) = self._rows(
                    "SELECT count(*) FROM keys WHERE owner = ? AND revoked_at IS NULL", (owner,)
                )[0]
                if live >= max_live:
                    raise QuotaExceeded(f"{owner} already has {live} keys (at most {max_live})")
            return self._insert(name, repositories, owner)

    def get(self, app_id: str) -> KeyInfo:
        return self._get(app_id)

    def list(self, owner: str | None = None) -> KeyList:
        """Every key, or only *owner*'s."""
        where, args = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        rows = self._rows(f"SELECT {_COLUMNS} FROM keys {where} ORDER BY created_at, app_id", args)
        return KeyList(_info(row) for row in rows)

    def revoke_owner(self, owner: str) -> tuple[str, ...]:
        """Revoke every live key of *owner*; the appIds revoked."""
        with self._transaction():
            rows = self._rows(
                "SELECT app_id FROM keys WHERE owner = ? AND revoked_at IS NULL", (owner,)
            )
            self._rows(
                "UPDATE keys SET revoked_at = ? WHERE owner = ? AND revoked_at IS NULL",
                (self._now(), owner),
            )
            revoked = tuple(app_id for (app_id,) in rows)
            self._announce_revoked(revoked)
        return revoked

    def revoke(self, app_id: str) -> KeyInfo:
        """Revoke a key; revoking a revoked key changes nothing."""
        with self._transaction():
            self._get(app_id)
            self._rows(
                "UPDATE keys SET revoked_at = ? WHERE app_id = ? AND revoked_at IS NULL",
                (self._now(), app_id),
            )
            self._announce_revoked([app_id])
            return self._get(app_id)

    def rotate(self, app_id: str) -> NewKey:
        """Replace a key by a new one with the same name and limits; revoke the old one."""
        with self._transaction():
            old = self._get(app_id)
            if old.revoked:
                raise KeyStoreError(f"key {app_id} is revoked; create a new key instead")
            new = self._insert(old.name, old.repositories, old.owner)
            self._rows(
                "UPDATE keys SET revoked_at = ?, replaced_by = ? WHERE app_id = ?",
                (self._now(), new.app_id, app_id),
            )
            self._announce_revoked([app_id])
            return new

    def verify(self, app_id: str, api_key: str) -> KeyInfo | None:
        """The key if *api_key* is its secret and it is not revoked, else None.

        The secret is compared in constant time, and an unknown appId costs
        the same hashing as a known one.
        """
        row = None
        if len(app_id) <= MAX_CREDENTIAL_LENGTH and len(api_key) <= MAX_CREDENTIAL_LENGTH:
            row = self._row(
                f"SELECT salt, secret_hash, {_COLUMNS} FROM keys WHERE app_id = ?", (app_id,)
            )
        salt, expected = (bytes(row[0]), bytes(row[1])) if row else (_UNKNOWN_SALT, b"")
        matches = hmac.compare_digest(_hash(salt, api_key[:MAX_CREDENTIAL_LENGTH]), expected)
        if row is None or not matches:
            return None
        info = _info(row[2:])
        return None if info.revoked else info

    def add_usage(self, usage: Mapping[str, Usage]) -> None:
        """Add batched usage counters, totals and per day, in one transaction."""
        with self._transaction():
            self._run_many(
                "UPDATE keys SET use_count = use_count + ?, bytes_served = bytes_served + ?,"
                f" last_used_at = {self._greatest}(coalesce(last_used_at, 0), ?)"
                " WHERE app_id = ?",
                [(u.requests, u.bytes, u.last_used, app_id) for app_id, u in usage.items()],
            )
            self._run_many(
                "INSERT INTO key_usage_daily (app_id, day, requests, bytes)"
                " SELECT app_id, ?, ?, ? FROM keys WHERE app_id = ?"
                " ON CONFLICT (app_id, day) DO UPDATE SET"
                " requests = key_usage_daily.requests + excluded.requests,"
                " bytes = key_usage_daily.bytes + excluded.bytes",
                [(u.last_used // DAY, u.requests, u.bytes, app_id) for app_id, u in usage.items()],
            )
            self._rows(
                "DELETE FROM key_usage_daily WHERE day <= ?", (self._now() // DAY - USAGE_DAYS,)
            )

    def daily_usage(self, owner: str | None, days: int) -> tuple[DailyUsage, ...]:
        """``(appId, day, requests, bytes)`` of the last *days* UTC days, today included.

        Only *owner*'s keys, or everyone's if None.
        """
        since = self._now() // DAY - days + 1
        query = (
            "SELECT u.app_id, u.day, u.requests, u.bytes FROM key_usage_daily u"
            " JOIN keys k ON k.app_id = u.app_id WHERE u.day >= ?"
        )
        args: tuple[Any, ...] = (since,)
        if owner is not None:
            query += " AND k.owner = ?"
            args += (owner,)
        rows = self._rows(query + " ORDER BY u.day, u.app_id", args)
        return tuple((a, d, r, b) for a, d, r, b in rows)

    def add_traffic(self, hour: int, requests: int) -> None:
        """Count *requests* answered in *hour* (hours since the epoch)."""
        with self._transaction():
            self._rows(
                "INSERT INTO traffic_hourly (hour, requests) VALUES (?, ?) ON CONFLICT (hour)"
                " DO UPDATE SET requests = traffic_hourly.requests + excluded.requests",
                (hour, requests),
            )
            self._rows("DELETE FROM traffic_hourly WHERE hour <= ?", (hour - TRAFFIC_HOURS,))

    def traffic(self, hours: int) -> dict[int, int]:
        """Requests per hour of the last *hours* hours, this one included."""
        since = self._now() // HOUR - hours + 1
        rows = self._rows("SELECT hour, requests FROM traffic_hourly WHERE hour >= ?", (since,))
        return {hour: requests for hour, requests in rows}

    def revoked_ids(self) -> frozenset[str]:
        rows = self._rows("SELECT app_id FROM keys WHERE revoked_at IS NOT NULL")
        return frozenset(app_id for (app_id,) in rows)

    def stats(self) -> dict[str, Any]:
        keys, revoked, requests, sent, last = self._rows(
            "SELECT count(*), count(revoked_at), coalesce(sum(use_count), 0),"
            " coalesce(sum(bytes_served), 0), max(last_used_at) FROM keys"
        )[0]
        return {
            "keys": keys,
            "active": keys - revoked,
            "revoked": revoked,
            # PostgreSQL sums integers as numeric.
            "requests": int(requests),
            "bytesServed": int(sent),
            "lastUsedAt": _iso(last),
        }

    def export(self) -> KeyDump:
        """Every key (hashes and salts as stored), its daily usage and the hourly traffic."""
        return (
            self._rows(f"SELECT {_ALL_KEY_COLUMNS} FROM keys ORDER BY created_at, app_id"),
            self._rows("SELECT app_id, day, requests, bytes FROM key_usage_daily"),
            self._rows("SELECT hour, requests FROM traffic_hourly"),
        )

    def load(self, dump: KeyDump) -> tuple[int, int]:
        """Copy the keys of *dump* (of :meth:`export`) that this store does not hold.

        A key held already stays as it is, usage included, so that copying
        again changes nothing.  Every key copied keeps its appId and secret
        hash, so its apiKey keeps working; traffic is copied for the hours
        this store has none.  Returns how many keys were copied and skipped.
        """
        keys, daily, traffic = dump
        with self._transaction():
            held = {app_id for (app_id,) in self._rows("SELECT app_id FROM keys")}
            new = [row for row in keys if row[0] not in held]
            copied = {row[0] for row in new}
            # A rotated key names its successor, made later: names are set once all exist.
            self._run_many(
                f"INSERT INTO keys ({_ALL_KEY_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                [(*row[:7], *row[8:]) for row in new],
            )
            self._run_many(
                "UPDATE keys SET replaced_by = ? WHERE app_id = ?",
                [(row[7], row[0]) for row in new if row[7] is not None],
            )
            self._run_many(
                "INSERT INTO key_usage_daily (app_id, day, requests, bytes) VALUES (?, ?, ?, ?)",
                [row for row in daily if row[0] in copied],
            )
            self._run_many(
                "INSERT INTO traffic_hourly (hour, requests) VALUES (?, ?)"
                " ON CONFLICT (hour) DO NOTHING",
                traffic,
            )
        return len(new), len(keys) - len(new)


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


#: Hashed against when an appId is unknown, so that it takes as long as a known one.
_UNKNOWN_SALT = secrets.token_bytes(_SALT_BYTES)
#: What a store that other servers share announces: [appId, ...] revoked.
REVOKED_TOPIC = "revoked"
_APP_ID_RE = re.compile(rf"{APP_ID_PREFIX}[{_APP_ID_ALPHABET}]{{{_APP_ID_LENGTH}}}")


class KeyBackend(Protocol):
    """Where a :class:`KeyStore` keeps its keys, and how it reaches them off the reactor."""

    #: What messages call it: a file, or a database.
    name: str
    #: Whether other nodes share it: its outage then hits every node alike.
    shared: bool
    #: Whether it can only verify keys, not write.
    read_only: bool

    def start(self) -> None:
        """Start the threads queries run in."""

    def stop(self) -> None:
        """Stop them."""

    def open(self) -> frozenset[str] | str:
        """Make the store ready (blocking): its revoked appIds, or why it is not ready."""

    async def in_thread(self, f: Callable[[], T]) -> T:
        """``f()`` in one of the store's threads."""

    async def run(self, f: Callable[[KeyQueries], T]) -> T:
        """``f(queries)`` in one of the store's threads; its errors as :class:`KeyStoreError`."""

    def close(self) -> None:
        """Close the store (blocking)."""


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


class KeyStore(service.Service):
    """The server's key store: queries in threads, batched usage counters.

    The store is opened when the service starts, not before: twistd forks
    to daemonize after making its services, and an SQLite connection must not
    cross a fork (its POSIX locks stay behind in the parent).

    ``revoked`` is the set of revoked appIds, refreshed at each flush, so that
    bearer tokens of a key revoked by ``dockmirror-admin`` stop working within
    :data:`FLUSH_INTERVAL` seconds rather than when they expire.  A store
    shared by several nodes also announces revocations (:meth:`share`),
    which then take effect at once.
    """

    def __init__(
        self, store: str | Path | KeyBackend, reactor: Any, flush_interval: float = FLUSH_INTERVAL
    ) -> None:
        """*store*: an SQLite file, or another :class:`KeyBackend`."""
        self.backend = SQLiteKeys(store, reactor) if isinstance(store, str | Path) else store
        self._reactor = reactor
        self._interval = flush_interval
        self._pending: dict[str, Usage] = {}
        self._loop = LoopingCall(self.flush)
        #: One flush at a time: the loop's, a resync's and the last one at stop.
        self._flushing = DeferredLock()
        self._loop.clock = reactor
        self._open = False
        #: Revocations heard while the revoked set is being reloaded.
        self._heard: set[str] | None = None
        self.revoked: frozenset[str] = frozenset()
        #: Why the database cannot be opened, while it cannot.
        self.unavailable: str | None = None
        #: Why the last usage counters could not be written, until a write succeeds.
        self.write_error: str | None = None

    def share(self, notifier: INotifier) -> None:
        """Hear of keys revoked elsewhere through *notifier*."""
        notifier.subscribe(REVOKED_TOPIC, self._revoked_elsewhere)

    def _revoked_elsewhere(self, app_ids: list[str]) -> None:
        heard = {a for a in app_ids if _APP_ID_RE.fullmatch(a)}
        self.revoked |= heard
        if self._heard is not None:
            self._heard |= heard

    def startService(self) -> None:
        # Opening is quick (a file, a few pragmas), and done before serving.
        # A key store that cannot be opened does not stop the mirror (a
        # restart would not mend it): it is tried again at every flush, and
        # meanwhile logins get 503 and /healthz says why.
        self._opened(self.backend.open())
        super().startService()
        self.backend.start()
        self._loop.start(self._interval, now=False)

    def _opened(self, result: frozenset[str] | str) -> None:
        if isinstance(result, str):
            if result != self.unavailable:
                log.error("the key store is unavailable: {error}", error=result)
            self.unavailable = result
            return
        if self.unavailable is not None:
            log.info("the key store {name} is open again", name=self.backend.name)
        self._open, self.unavailable = True, None
        self.revoked |= result
        if self.backend.read_only:
            self.write_error = f"{self.backend.name} is on a read-only file system"
            log.error("the key store {error}: key usage is kept in memory", error=self.write_error)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        await self.flush()
        if self._open:
            await self.backend.in_thread(self.backend.close)
        self.backend.stop()

    async def _query(self, f: Callable[[KeyQueries], T]) -> T:
        """Run ``f(queries)`` in the store's thread; KeyStoreError if it is unavailable."""
        if not self._open:
            raise KeyStoreError(f"the key store is unavailable: {self.unavailable}")
        return await self.backend.run(f)

    def record(self, app_id: str, nbytes: int) -> None:
        """Count one request by *app_id* that sent *nbytes*; written at the next flush."""
        now = int(self._reactor.seconds())
        self._pending.setdefault(app_id, Usage()).add(1, nbytes, now)

    def flush(self) -> Deferred[None]:
        """Write the pending usage counters and reload the revoked set.

        A flush asked for while another runs waits for it, then runs.
        """
        return self._flushing.run(lambda: Deferred.fromCoroutine(self._flush()))

    async def _flush(self) -> None:
        """Never fails: an error is logged and the usage kept for the next flush,
        so that the loop (and with it revocations reaching tokens) goes on."""
        if not self._open:
            self._opened(await self.backend.in_thread(self.backend.open))
        if not self._open:
            return  # the usage waits in memory for the database to open
        pending, self._pending = self._pending, {}
        try:
            if pending:
                await self._query(lambda db: db.add_usage(pending))
                pending = {}
                self.write_error = None
            self._heard = set()
            revoked = await self._query(lambda db: db.revoked_ids())
            self.revoked = revoked | self._heard
        except KeyStoreError as e:
            if str(e) != self.write_error:
                log.error("cannot write key usage: {error}", error=str(e))
            self.write_error = str(e)
        except Exception:  # noqa: BLE001 - logged; the loop must go on
            log.failure("unexpected error writing key usage")
        finally:
            self._heard = None
        for app_id, usage in pending.items():
            self._pending.setdefault(app_id, Usage()).add(
                usage.requests, usage.bytes, usage.last_used
            )

    async def check(self) -> bool | str:
        """For ``/healthz``: True while the database answers a query."""
        if not self._open:
            return f"the key store is unavailable: {self.unavailable or 'not open'}"
        try:
            await self._query(lambda db: db.revoked_ids())
        except KeyStoreError as e:
            return str(e)
        return True

    async def verify(self, app_id: str, api_key: str) -> KeyInfo | None:
        return await self._query(lambda db: db.verify(app_id, api_key))

    async def create(
        self,
        name: str,
        repositories: Sequence[str] | None = None,
        owner: str = OPERATOR,
        max_live: int | None = None,
    ) -> NewKey:
        return await self._query(lambda db: db.create(name, repositories, owner, max_live))

    async def get(self, app_id: str) -> KeyInfo:
        return await self._query(lambda db: db.get(app_id))

    async def list(self, owner: str | None = None) -> KeyList:
        return await self._query(lambda db: db.list(owner))

    async def revoke_owner(self, owner: str) -> tuple[str, ...]:
        """Revoke every key of *owner*; their tokens stop working at once here."""
        revoked = await self._query(lambda db: db.revoke_owner(owner))
        self.revoked |= set(revoked)
        return revoked

    async def daily_usage(self, owner: str | None, days: int) -> tuple[DailyUsage, ...]:
        return await self._query(lambda db: db.daily_usage(owner, days))

    async def add_traffic(self, hour: int, requests: int) -> None:
        await self._query(lambda db: db.add_traffic(hour, requests))

    async def traffic(self, hours: int) -> dict[int, int]:
        return await self._query(lambda db: db.traffic(hours))

    async def revoke(self, app_id: str) -> KeyInfo:
        info = await self._query(lambda db: db.revoke(app_id))
        self.revoked |= {app_id}
        return info

    async def rotate(self, app_id: str) -> NewKey:
        new = await self._query(lambda db: db.rotate(app_id))
        self.revoked |= {app_id}
        return new

    async def stats(self) -> dict[str, Any]:
        stats = await self._query(lambda db: db.stats())
        stats["pendingUsage"] = sum(u.requests for u in self._pending.values())
        return stats
