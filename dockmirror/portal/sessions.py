"""Server-side sessions, sign-ins in progress and users: the portal's store.

:class:`PortalQueries` is what the store does, in SQL that SQLite and
PostgreSQL share.  :class:`PortalDatabase` runs it synchronously over the
portal's SQLite file (``dockmirror-admin users disable`` uses it as it is);
:class:`SessionStore` is the server's service around it, running every
query on one dedicated thread.  With ``[cluster] database``, the tables are
in PostgreSQL instead (:mod:`dockmirror.cluster.portal`).  Every request
looks its session up in the store, so a sign-out or a disabled user takes
effect at once on every process (and node) sharing it.

Only SHA-256 digests of session ids and OAuth states are stored.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from dockmirror.auth.keys import iso_time
from dockmirror.auth.secretfile import make_private_directory
from dockmirror.sqlite import connect, write_transaction

T = TypeVar("T")

#: The portal database, in the state directory.
DATABASE_FILE = "portal.sqlite"
#: Secrets made on first start, in the state directory: they sign session
#: cookies and make CSRF tokens.
SESSION_SECRET_FILE = "portal_session_secret"
CSRF_SECRET_FILE = "portal_csrf_secret"
SCHEMA_VERSION = 1
#: Seconds a sign-in may take at the provider.
LOGIN_TTL = 600
#: Sign-ins in progress kept at most; the oldest go first.
MAX_LOGINS = 10_000
#: Sessions one identity may have at once; signing in again ends the oldest.
MAX_SESSIONS_PER_USER = 20


class PortalStoreError(Exception):
    """The portal database cannot be used; the message says why."""


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class Session:
    """A signed-in browser (its id is never stored, only its digest)."""

    session_id: str
    identity: str
    name: str
    expires_at: int


@dataclass(frozen=True)
class PendingLogin:
    provider: str
    verifier: str
    nonce: str


@dataclass(frozen=True)
class User:
    identity: str
    name: str
    first_seen: int
    last_seen: int
    disabled_at: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "name": self.name,
            "firstSeen": iso_time(self.first_seen),
            "lastSeen": iso_time(self.last_seen),
            "disabled": self.disabled_at is not None,
        }

    def __repr__(self) -> str:
        state = "disabled" if self.disabled_at is not None else "active"
        return f"<user {self.identity} {self.name!r} {state}, last seen {iso_time(self.last_seen)}>"


#: Every row of the portal's tables, as :meth:`PortalQueries.export` gives them.
PortalDump = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


class PortalQueries:
    """What the portal's store does, in SQL that SQLite and PostgreSQL both speak.

    A subclass gives the connection: how a statement runs (:meth:`_rows`),
    what a write transaction is (:meth:`_transaction`), and the names of its
    tables.  Statements use ``?`` placeholders.
    """

    _sessions = "sessions"
    _logins = "logins"
    _users = "users"
    #: Skips a query's first rows and keeps all the others (PostgreSQL: ``OFFSET`` alone).
    _skip = "LIMIT -1 OFFSET"

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows."""
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[object]:
        """A write transaction: one writer at a time, whatever the process."""
        raise NotImplementedError

    def _row(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _now(self) -> int:
        return int(self._clock())

    # --- sign-ins in progress ---------------------------------------------------------

    def begin_login(self, state: str, login: PendingLogin) -> None:
        now = self._now()
        with self._transaction():
            self._rows(f"DELETE FROM {self._logins} WHERE created_at <= ?", (now - LOGIN_TTL,))
            self._rows(
                f"DELETE FROM {self._logins} WHERE state_hash IN (SELECT state_hash"
                f" FROM {self._logins} ORDER BY created_at DESC {self._skip} ?)",
                (MAX_LOGINS - 1,),
            )
            self._rows(
                f"INSERT INTO {self._logins} (state_hash, provider, verifier, nonce, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (digest(state), login.provider, login.verifier, login.nonce, now),
            )

    def finish_login(self, state: str) -> PendingLogin | None:
        """The sign-in *state* began, once: a state is forgotten when used."""
        with self._transaction():
            row = self._row(
                f"DELETE FROM {self._logins} WHERE state_hash = ? AND created_at > ?"
                " RETURNING provider, verifier, nonce",
                (digest(state), self._now() - LOGIN_TTL),
            )
        return PendingLogin(*row) if row else None

    # --- sessions ---------------------------------------------------------------------

    def create_session(self, session_id: str, identity: str, name: str, ttl: int) -> Session:
        """Sign *identity* in (the caller checked it is not disabled)."""
        now = self._now()
        with self._transaction():
            self._rows(f"DELETE FROM {self._sessions} WHERE expires_at <= ?", (now,))
            self._rows(
                f"INSERT INTO {self._users} (identity, name, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (identity) DO UPDATE SET name = excluded.name,"
                " last_seen = excluded.last_seen",
                (identity, name, now, now),
            )
            self._rows(
                f"DELETE FROM {self._sessions} WHERE id_hash IN (SELECT id_hash"
                f" FROM {self._sessions} WHERE identity = ? ORDER BY created_at DESC"
                f" {self._skip} ?)",
                (identity, MAX_SESSIONS_PER_USER - 1),
            )
            self._rows(
                f"INSERT INTO {self._sessions} (id_hash, identity, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (digest(session_id), identity, now, now + ttl),
            )
        return Session(session_id, identity, name, now + ttl)

    def get_session(self, session_id: str) -> Session | None:
        """The live session *session_id*, or None (unknown, expired, or a disabled user)."""
        row = self._row(
            f"SELECT s.identity, u.name, s.expires_at FROM {self._sessions} s"
            f" JOIN {self._users} u USING (identity)"
            " WHERE s.id_hash = ? AND s.expires_at > ? AND u.disabled_at IS NULL",
            (digest(session_id), self._now()),
        )
        return Session(session_id, *row) if row else None

    def end_session(self, session_id: str) -> None:
        with self._transaction():
            self._rows(f"DELETE FROM {self._sessions} WHERE id_hash = ?", (digest(session_id),))

    # --- users ------------------------------------------------------------------------

    def is_disabled(self, identity: str) -> bool:
        row = self._row(
            f"SELECT 1 FROM {self._users} WHERE identity = ? AND disabled_at IS NOT NULL",
            (identity,),
        )
        return row is not None

    def set_disabled(self, identity: str, disabled: bool) -> int:
        """Disable (ending every session) or enable *identity*; the sessions ended."""
        now = self._now()
        with self._transaction():
            self._rows(
                f"INSERT INTO {self._users} (identity, name, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (identity) DO NOTHING",
                (identity, identity.partition(":")[2], now, now),
            )
            self._rows(
                f"UPDATE {self._users} SET disabled_at = ? WHERE identity = ?",
                (now if disabled else None, identity),
            )
            if not disabled:
                return 0
            ended = self._rows(
                f"DELETE FROM {self._sessions} WHERE identity = ? RETURNING 1", (identity,)
            )
        return len(ended)

    def users(self) -> list[User]:
        rows = self._rows(
            "SELECT identity, name, first_seen, last_seen, disabled_at"
            f" FROM {self._users} ORDER BY identity"
        )
        return [User(*row) for row in rows]

    # --- copying a store --------------------------------------------------------------

    def export(self) -> PortalDump:
        """Every user, and every live session (by its digest, as stored)."""
        return (
            self._rows(
                "SELECT identity, name, first_seen, last_seen, disabled_at"
                f" FROM {self._users} ORDER BY identity"
            ),
            self._rows(
                f"SELECT id_hash, identity, created_at, expires_at FROM {self._sessions}"
                " WHERE expires_at > ?",
                (self._now(),),
            ),
        )

    def load(self, dump: PortalDump) -> tuple[int, int, int]:
        """Copy the users of *dump* (of :meth:`export`) that this store does not hold,
        with their sessions.

        A user held already stays as it is (disabled or not, with its own
        sessions), so that copying again changes nothing.  Returns how many
        users were copied and skipped, and how many sessions were copied.
        """
        users, sessions = dump
        with self._transaction():
            held = {identity for (identity,) in self._rows(f"SELECT identity FROM {self._users}")}
            new = [row for row in users if row[0] not in held]
            copied = {row[0] for row in new}
            theirs = [row for row in sessions if row[1] in copied]
            for row in new:
                self._rows(
                    f"INSERT INTO {self._users}"
                    " (identity, name, first_seen, last_seen, disabled_at) VALUES (?, ?, ?, ?, ?)",
                    row,
                )
            for row in theirs:
                self._rows(
                    f"INSERT INTO {self._sessions} (id_hash, identity, created_at, expires_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (id_hash) DO NOTHING",
                    (bytes(row[0]), *row[1:]),
                )
        return len(new), len(users) - len(new), len(theirs)


class PortalDatabase(PortalQueries):
    """The portal's tables in their SQLite file, over one connection (one thread at a time)."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self.path = Path(path)
        make_private_directory(self.path.parent)
        try:
            self.path.touch(mode=0o600, exist_ok=True)
            self._conn = connect(self.path)
            self._conn.executescript(
                resources.files("dockmirror.portal").joinpath("schema.sql").read_text()
            )
            (version,) = self._conn.execute("SELECT version FROM version").fetchone()
        except (sqlite3.Error, OSError) as e:
            raise PortalStoreError(f"{self.path}: {e}") from None
        if version != SCHEMA_VERSION:
            self._conn.close()
            raise PortalStoreError(
                f"{self.path}: portal database schema version {version};"
                f" this dockmirror knows version {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        self._conn.close()

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, args).fetchall()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._conn)


class PortalStore(Protocol):
    """Where the server keeps the portal's tables, reached off the reactor."""

    async def run(self, f: Callable[..., T], *args: Any) -> T:
        """``f(queries, *args)`` in a thread of the store; errors as :class:`PortalStoreError`."""


class SessionStore(service.Service):
    """The server's portal database: one thread runs every query.

    Opened when the service starts (after twistd forks), like the key store.
    """

    def __init__(self, path: str | Path, reactor: Any) -> None:
        self.path = Path(path)
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="dockmirror-portal-db")

    def startService(self) -> None:
        self._db = PortalDatabase(self.path, clock=self._reactor.seconds)
        super().startService()
        self._pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        done = deferToThreadPool(self._reactor, self._pool, self._db.close)
        return done.addBoth(lambda _: self._pool.stop())

    async def run(self, f: Callable[..., T], *args: Any) -> T:
        """``f(database, *args)`` on the database thread."""
        try:
            return await deferToThreadPool(self._reactor, self._pool, f, self._db, *args)
        except sqlite3.Error as e:
            raise PortalStoreError(f"{self.path}: {e}") from e
