"""The portal's users, sessions and sign-ins in progress in PostgreSQL, shared by every node.

:class:`PostgresPortalDatabase` runs the portal's queries
(:class:`~dockmirror.portal.sessions.PortalQueries`) on one connection, in
tables of their own (``portal.sql``).  A session opened on one node is
valid on every node at once, and a sign-in begun on one node may come back
from the provider to any other: its OAuth state, PKCE verifier and nonce
are in the database, by a SHA-256 of the state, and taken once.  Every
request looks its session up, so a disabled user's sessions end on every
node with the transaction that disables them.

:class:`PostgresSessions` is the server's
:class:`~dockmirror.portal.sessions.PortalStore` over the process's pool.
While PostgreSQL is down its queries fail with
:class:`~dockmirror.portal.sessions.PortalStoreError` (the portal answers
its 503 page), at once rather than each waiting for a connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from importlib import resources
from typing import Any, TypeVar

import psycopg

from dockmirror.cluster.database import (
    Backoff,
    Database,
    DatabaseUnavailable,
    apply_schema,
    fetch_rows,
    locked_transaction,
)
from dockmirror.cluster.keys import call_briefly
from dockmirror.portal.sessions import PortalQueries, PortalStoreError

T = TypeVar("T")

#: The cluster secrets that sign session cookies and make CSRF tokens.
SESSION_SECRET = "portal-session-secret"
CSRF_SECRET = "portal-csrf-secret"


def schema() -> str:
    """The portal's tables (``portal.sql``)."""
    return resources.files("dockmirror.cluster").joinpath("portal.sql").read_text()


class PostgresPortalDatabase(PortalQueries):
    """The portal's queries on one PostgreSQL connection in autocommit mode."""

    _sessions = "portal_sessions"
    _logins = "portal_logins"
    _users = "portal_users"
    _skip = "OFFSET"

    def __init__(
        self, conn: psycopg.Connection[Any], clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(clock)
        self._conn = conn

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return fetch_rows(self._conn, sql, args)

    def _transaction(self) -> AbstractContextManager[None]:
        return locked_transaction(self._conn, "dockmirror-portal")


class PostgresSessions:
    """The portal's store on every node: the cluster database, through the process's pool."""

    def __init__(self, database: Database, reactor: Any) -> None:
        self.database = database
        self._reactor = reactor
        self._backoff = Backoff(reactor)
        #: Whether the tables are known to exist (made by the first query otherwise).
        self._ready = False

    def __repr__(self) -> str:
        return f"<PostgresSessions {self.database!r}>"

    def _query(
        self, f: Callable[..., T], args: tuple[Any, ...], conn: psycopg.Connection[Any]
    ) -> T:
        if not self._ready:
            apply_schema(conn, schema())
            self._ready = True
        return f(PostgresPortalDatabase(conn, self._reactor.seconds), *args)

    async def run(self, f: Callable[..., T], *args: Any) -> T:
        """``f(queries, *args)`` in a database thread."""
        try:
            return await self._backoff.run(
                partial(self.database.run, partial(self._query, f, args))
            )
        except DatabaseUnavailable as e:
            raise PortalStoreError(f"{self.database!r} is unavailable: {e}") from e
        except psycopg.Error as e:
            raise PortalStoreError(f"{self.database!r}: {str(e).strip()}") from e


def with_portal(url: str, f: Callable[[PortalQueries], T]) -> T:
    """``f(portal store)`` on the cluster database, for ``dockmirror-admin`` (blocking)."""

    def query(conn: psycopg.Connection[Any]) -> T:
        apply_schema(conn, schema())
        return f(PostgresPortalDatabase(conn))

    try:
        return call_briefly(url, query, "dockmirror-admin")
    except (DatabaseUnavailable, psycopg.Error) as e:
        raise PortalStoreError(f"{Database(url, None)!r}: {str(e).strip()}") from None
