"""The cluster's PostgreSQL database: a connection pool whose queries run in threads.

The reactor never waits on PostgreSQL: :meth:`Database.run` hands a function
of one connection to a thread of the database's own pool and returns a
Deferred-backed coroutine.  Connections are checked before use and made
anew after PostgreSQL restarts, so a node outlives its database's outages:
queries fail with :class:`DatabaseUnavailable` while it is down, and work
again once it is back, without a restart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

log = Logger()
T = TypeVar("T")
Row = tuple[Any, ...]

#: Seconds a query waits for a free, working connection before failing.
CONNECT_TIMEOUT = 5.0
#: Threads, and so connections, a process uses for its queries (``[cluster] pool_size``).
MAX_CONNECTIONS = 8
#: Connections a process keeps besides its pool: the one listening for
#: notifications, and (with ``node_url``) the session holding its fill claims.
OWN_CONNECTIONS = 2
#: Seconds the pool keeps trying to replace a lost connection (with backoff);
#: then the next query tries afresh.  Bounded, so that a node is back within
#: seconds of PostgreSQL, however long it was away.
RECONNECT_TIMEOUT = 5.0
#: Seconds a node goes without asking PostgreSQL after it could not reach it (for the
#: cache's shared parts, ``[cluster] backoff``).
BACKOFF = 5.0


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached now; the operation may be retried later."""


class Backoff:
    """Skips PostgreSQL for a few seconds after it failed, rather than wait for it each time.

    Only news newer than the last success counts: a query that began before
    another one succeeded, and then failed (it waited for a connection while
    PostgreSQL came back), does not start a backoff, and a success ends one.
    The outage is logged once as it begins and once as it ends, for *what*
    (the part of the node whose queries these are), however many fail.
    """

    def __init__(
        self, clock: IReactorTime, seconds: float = BACKOFF, what: str = "cluster database"
    ) -> None:
        self._clock = clock
        self._seconds = seconds
        self._what = what
        self._until = 0.0
        self._succeeded = float("-inf")
        self._down = False

    async def run(self, query: Callable[[], Awaitable[T]]) -> T:
        """``await query()``; raises :class:`DatabaseUnavailable` at once while backing off."""
        started = self._clock.seconds()
        if started < self._until:
            raise DatabaseUnavailable("PostgreSQL failed a moment ago")
        try:
            result = await query()
        except DatabaseUnavailable as e:
            if started >= self._succeeded:
                self._until = self._clock.seconds() + self._seconds
                if not self._down:
                    self._down = True
                    log.warn(
                        "{what}: PostgreSQL is unavailable ({error}); asking it again every"
                        " {seconds:.0f}s at most, without a warning until it is back",
                        what=self._what,
                        error=str(e),
                        seconds=self._seconds,
                    )
            raise
        self._succeeded = self._clock.seconds()
        self._until = 0.0
        if self._down:
            self._down = False
            log.info("{what}: PostgreSQL is back", what=self._what)
        return result


def logged(what: str) -> Callable[[Failure], None]:
    """An errback for a query about *what*: a warning if it failed, unless because
    PostgreSQL is unavailable (the :class:`Backoff` the query went through logs that once)."""

    def failed(failure: Failure) -> None:
        failure.trap(DatabaseUnavailable, psycopg.Error)
        if not failure.check(DatabaseUnavailable):
            log.warn("{what}: {error}", what=what, error=failure.getErrorMessage().strip())

    return failed


class Database:
    """One node's connections to the cluster database."""

    def __init__(
        self,
        url: str,
        reactor: Any,
        *,
        max_connections: int = MAX_CONNECTIONS,
        name: str = "dockmirror",
    ) -> None:
        self.url = url
        self._reactor = reactor
        self._threads = ThreadPool(minthreads=0, maxthreads=max_connections, name=f"{name}-db")
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            open=False,
            timeout=CONNECT_TIMEOUT,
            check=ConnectionPool.check_connection,
            reconnect_timeout=RECONNECT_TIMEOUT,
            kwargs={"autocommit": True, "application_name": name, "connect_timeout": 5},
            name=name,
        )

    def __repr__(self) -> str:
        return f"<Database {psycopg.conninfo.make_conninfo(self.url, password='***')}>"

    def start(self) -> None:
        """Open the pool; connections are made in the background."""
        self._pool.open(wait=False)
        self._threads.start()

    def stop(self) -> None:
        self._threads.stop()
        self._pool.close()

    async def run(self, f: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``f(connection)`` in a database thread; raises :class:`DatabaseUnavailable`."""
        result: T = await deferToThreadPool(self._reactor, self._threads, partial(self.call, f))
        return result

    def call(self, f: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``f(connection)`` in the calling thread, which must not be the reactor's."""
        try:
            with self._pool.connection() as conn:
                return f(conn)
        except (PoolTimeout, psycopg.OperationalError) as e:
            raise DatabaseUnavailable(str(e).strip() or type(e).__name__) from e

    def migrate(self, schema: str, timeout: float = 30.0) -> None:
        """Create the tables of *schema* once, whichever node starts first (blocking)."""
        with self._pool.connection(timeout=timeout) as conn:
            apply_schema(conn, schema)


def fetch_rows(conn: psycopg.Connection[Any], sql: str, args: Sequence[Any] = ()) -> list[Row]:
    """Run *sql*, written with ``?`` placeholders as for SQLite, on *conn*; its rows."""
    cursor = conn.execute(sql.replace("?", "%s"), args)
    return cursor.fetchall() if cursor.description is not None else []


@contextmanager
def locked_transaction(conn: psycopg.Connection[Any], lock: str) -> Iterator[None]:
    """A transaction on *conn* holding the advisory lock named *lock* from its start.

    The writers of one set of tables take the same lock, one at a time, as
    SQLite's writers take the database's, so that they never deadlock.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (lock,))
        yield


def apply_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create the tables of *schema* on *conn*, one node at a time (blocking)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dockmirror-schema'))")
        conn.execute(schema)


def connections_needed(workers: int, pool_size: int) -> int:
    """The most connections a node of *workers* processes opens to PostgreSQL."""
    return workers * (pool_size + OWN_CONNECTIONS)


def connections_allowed(conn: psycopg.Connection[Any]) -> int:
    """The connections PostgreSQL lets roles without special privileges open."""
    row = conn.execute(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
        " - COALESCE(NULLIF(current_setting('reserved_connections', true), ''), '0')::int"
    ).fetchone()
    assert row is not None
    return int(row[0])


class DatabaseService(service.Service):
    """Opens the node's connections when the mirror starts (not before twistd forks).

    With *needed* (the connections the whole node may open), it says once
    started how many such nodes PostgreSQL's ``max_connections`` allows,
    with a warning if not even this one.
    """

    def __init__(self, database: Database, needed: int | None = None) -> None:
        self.database = database
        self._needed = needed

    def startService(self) -> None:
        super().startService()
        self.database.start()
        if self._needed is not None:
            d = Deferred.fromCoroutine(self.database.run(connections_allowed))
            d.addCallbacks(self._allowed, lambda f: f.trap(DatabaseUnavailable, psycopg.Error))

    def _allowed(self, allowed: int) -> None:
        needed = self._needed
        if needed is not None and needed > allowed:
            log.warn(
                "this node may open {needed} connections to PostgreSQL, which allows"
                " {allowed}: raise its max_connections or lower [cluster] pool_size",
                needed=needed,
                allowed=allowed,
            )
        else:
            log.info(
                "this node may open {needed} connections to PostgreSQL, which allows"
                " {allowed}: room for {nodes} such nodes",
                needed=needed,
                allowed=allowed,
                nodes=allowed // needed if needed else 0,
            )

    def stopService(self) -> None:
        super().stopService()
        self.database.stop()
