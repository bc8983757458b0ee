"""The key store and the token signing key in PostgreSQL, shared by every node.

:class:`PostgresKeyDatabase` runs the key store's queries
(:class:`~dockmirror.auth.queries.KeyQueries`) on one connection: the same
keys, hashed the same way, with every node's usage counters added up.  Its
write transactions take one advisory lock, as SQLite's writers take the
database's, so that two nodes flushing their counters never deadlock and a
quota check holds.  A revocation is announced by ``NOTIFY`` when it commits
(:mod:`dockmirror.cluster.notify`), whoever makes it: a node, its manhole,
its portal or ``dockmirror-admin``.

:class:`PostgresKeys` is the server's :class:`~dockmirror.auth.keystore.KeyBackend`
over the node's pool.  While PostgreSQL is down, key operations fail with
:class:`~dockmirror.auth.keys.KeyStoreError` (logins get a 503), and
fail at once rather than each waiting for a connection, until a query is
tried again :data:`RETRY_INTERVAL` later.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from dockmirror.auth.keys import KeyStoreError
from dockmirror.auth.queries import REVOKED_TOPIC, KeyQueries, Row
from dockmirror.auth.secretfile import read, replace
from dockmirror.auth.tokens import generate_signing_key
from dockmirror.cluster.database import (
    CONNECT_TIMEOUT,
    Backoff,
    Database,
    DatabaseUnavailable,
    fetch_rows,
    locked_transaction,
)
from dockmirror.cluster.notify import MAX_STRINGS, notification_key, notify

log = Logger()
T = TypeVar("T")

#: Seconds between reloads of the revoked keys (and writes of usage counters):
#: the fallback that keeps a revocation whose notification was lost within
#: the 5 seconds the README promises.
POLL_INTERVAL = 4.0
#: Seconds during which queries fail at once after PostgreSQL was found down.
RETRY_INTERVAL = 1.0
#: The shared secret that is the token signing key's PEM.
SIGNING_KEY = "token-signing-key"


def schema() -> str:
    """The cluster key store's tables (``keys.sql``)."""
    return resources.files("dockmirror.cluster").joinpath("keys.sql").read_text()


class PostgresKeyDatabase(KeyQueries):
    """The key store's queries on one PostgreSQL connection in autocommit mode."""

    _greatest = "greatest"

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        clock: Callable[[], float] = time.time,
        notify_key: bytes | None = None,
    ) -> None:
        super().__init__(clock)
        self._conn = conn
        #: The key that signs notifications; read from the database when not given.
        self._notify_key = notify_key

    def __repr__(self) -> str:
        return f"<PostgresKeyDatabase {self._conn.info.dbname}>"

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return fetch_rows(self._conn, sql, args)

    def _run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._conn.cursor().executemany(sql.replace("?", "%s"), rows)

    def _transaction(self) -> AbstractContextManager[None]:
        return locked_transaction(self._conn, "dockmirror-keys")

    def shared_secret(self, name: str, generate: Callable[[], bytes]) -> bytes:
        """The secret *name* every node shares, made with *generate* by the first to ask.

        Nodes starting together agree: the first insert wins, the others' are
        dropped, and every node reads the winner.
        """
        self._rows(
            "INSERT INTO cluster_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (name, generate()),
        )
        ((value,),) = self._rows("SELECT value FROM cluster_secrets WHERE name = ?", (name,))
        return bytes(value)

    def _announce_revoked(self, app_ids: Sequence[str]) -> None:
        if self._notify_key is None:
            self._notify_key = notification_key(
                self.shared_secret(SIGNING_KEY, generate_signing_key)
            )
        for start in range(0, len(app_ids), MAX_STRINGS):
            chunk = list(app_ids[start : start + MAX_STRINGS])
            notify(self._conn, REVOKED_TOPIC, chunk, self._notify_key)


class PostgresKeys:
    """The key store of every node: the cluster database, through the node's pool."""

    shared = True
    read_only = False

    def __init__(self, database: Database, reactor: Any, notify_key: bytes) -> None:
        self.database = database
        self.name = repr(database)
        self._reactor = reactor
        self._notify_key = notify_key
        self._backoff = Backoff(reactor, RETRY_INTERVAL)

    def start(self) -> None:
        pass  # the database is a service of its own

    def stop(self) -> None:
        pass

    def open(self) -> frozenset[str] | str:
        try:
            self.database.migrate(schema(), timeout=CONNECT_TIMEOUT)
            return self.database.call(lambda conn: PostgresKeyDatabase(conn).revoked_ids())
        except (DatabaseUnavailable, psycopg.Error) as e:
            return f"{self.name}: {str(e).strip()}"

    async def in_thread(self, f: Callable[[], T]) -> T:
        result: T = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f)
        return result

    async def run(self, f: Callable[[KeyQueries], T]) -> T:
        try:
            return await self._backoff.run(
                lambda: self.database.run(
                    lambda conn: f(PostgresKeyDatabase(conn, notify_key=self._notify_key))
                )
            )
        except DatabaseUnavailable as e:
            raise KeyStoreError(f"{self.name} is unavailable: {e}") from e
        except psycopg.Error as e:
            raise KeyStoreError(f"{self.name}: {str(e).strip()}") from e

    def close(self) -> None:
        pass


def call_briefly(url: str, f: Callable[[psycopg.Connection[Any]], T], name: str) -> T:
    """``f(connection)`` on a connection of its own, once the tables exist (blocking).

    For what runs before the node's pool or without one: start-up, ``dockmirror-admin``.
    """
    database = Database(url, None, max_connections=1, name=name)
    database.start()
    try:
        database.migrate(schema(), timeout=CONNECT_TIMEOUT)
        return database.call(f)
    finally:
        database.stop()


def with_keys(url: str, f: Callable[[KeyQueries], T]) -> T:
    """``f(key store)`` on the cluster database, for ``dockmirror-admin`` (blocking).

    Raises :class:`KeyStoreError` when the database fails.
    """
    try:
        return call_briefly(url, lambda conn: f(PostgresKeyDatabase(conn)), "dockmirror-admin")
    except (DatabaseUnavailable, psycopg.Error) as e:
        raise KeyStoreError(f"{Database(url, None)!r}: {str(e).strip()}") from None


def cluster_signing_key(url: str, copy: Path) -> bytes:
    """The PEM of the token signing key that every node shares, kept in PostgreSQL.

    The first node to start makes it.  A copy is kept at *copy*, so that a
    node restarted while PostgreSQL is down still verifies the tokens it and
    the others issued.  Blocking: called while the service is built.
    """
    return cluster_secret(url, SIGNING_KEY, generate_signing_key, copy, "the token signing key")


def cluster_secret(
    url: str, name: str, generate: Callable[[], bytes], copy: Path, what: str
) -> bytes:
    """The secret *name* that every node shares (*what* it is, for messages).

    Made with *generate* by the first node to ask, and kept in PostgreSQL;
    a copy is kept at *copy*, used when the node starts while PostgreSQL is
    down.  Blocking: called while the service is built.
    """
    try:
        value = call_briefly(
            url,
            lambda conn: PostgresKeyDatabase(conn).shared_secret(name, generate),
            "dockmirror-start",
        )
    except (DatabaseUnavailable, psycopg.Error) as e:
        where = repr(Database(url, None))
        try:
            value = read(copy)
        except FileNotFoundError:
            raise KeyStoreError(
                f"cannot load {what} from {where}: {str(e).strip()};"
                f" and there is no copy of it in {copy} yet"
            ) from None
        log.warn(
            "cannot load {what} from {database}: {error}; using the copy in {copy}",
            what=what,
            database=where,
            error=str(e).strip(),
            copy=str(copy),
        )
        return value
    replace(copy, value)
    return value
