"""Fill claims across the nodes of a cluster: PostgreSQL advisory locks and a ``fills`` table.

Each process keeps one session connection of its own to PostgreSQL, used by
one thread, on which it takes a session-level advisory lock per digest it
fills.  PostgreSQL drops a session's locks when its connection ends, so a
node killed mid-fill frees its digests as soon as its connection closes,
which the kernel does at once.  The node holding the lock writes a row of
``fills`` (digest, its node URL, size, start), which tells the others whom
to follow; a row a dead node left is replaced by the next holder.

:class:`ClusterCoordinator` wraps the coordinator of the processes sharing
one cache directory (:mod:`dockmirror.coordination`): claims, releases and
the quota counter of the local tier stay local and cheap, and the one
process of a node that takes a digest's local claim then calls
:meth:`ClusterCoordinator.lead` to learn whether it fetches the blob from
the upstream (it took the cluster's lock) or from another node, which fills
it or has it.  The reactor never waits on PostgreSQL: every query runs in
the session's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import psycopg
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.iweb import IResponse
from zope.interface import implementer

from dockmirror._interfaces import ICoordinator
from dockmirror.cluster.database import BACKOFF, Backoff, DatabaseUnavailable, logged
from dockmirror.cluster.peers import PeerClient
from dockmirror.coordination import FLIGHT_RESULT_MAX
from dockmirror.upstream import discard

log = Logger()
T = TypeVar("T")

#: Looks at who holds a digest's lock before fetching it alone ...
LEAD_ATTEMPTS = 40
#: ... and seconds between them (a dead node's session takes a moment to end).
LEAD_INTERVAL = 0.25
#: How PostgreSQL finds out that a node vanished without closing its connection
#: (powered off, cut off): TCP keepalives on its side, so that the node's claims
#: are released within about 25 s.
SESSION_OPTIONS = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
#: The longest string of a flight's result read from the database.
RESULT_STRING_MAX = 1024
#: Advisory lock keys of fills have this bit set, clear of ``hashtext()`` keys ...
_KEY_BIT = 1 << 60
#: ... and those of shared flights (see :class:`FlightClaims`) this one too.
_FLIGHT_BIT = 1 << 61


def lock_key(digest: str) -> int:
    """The advisory lock key of *digest*: 60 bits of its hex, tagged."""
    return int(digest.rpartition(":")[2][:15], 16) | _KEY_BIT


class Session:
    """One PostgreSQL connection of this process, used by one thread of its own.

    Session-level advisory locks belong to it; if it breaks, PostgreSQL has
    released them, and :attr:`generation` moves on so that the coordinator
    forgets what it held.
    """

    def __init__(self, url: str, reactor: Any, name: str = "dockmirror-fills") -> None:
        self._url = url
        self._reactor = reactor
        self._name = name
        self._threads = ThreadPool(minthreads=1, maxthreads=1, name=name)
        self._conn: psycopg.Connection[Any] | None = None
        self.generation = 0

    def start(self) -> None:
        self._threads.start()

    def stop(self) -> None:
        self._threads.stop()  # waits for the thread, which owns the connection
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run(self, f: Callable[[psycopg.Connection[Any]], T]) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._threads, partial(self._call, f))

    def _call(self, f: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``f(connection)``; once more on a new connection if PostgreSQL dropped the one
        this session had (it restarted meanwhile): the locks went with it, and so did
        whatever *f* had begun."""
        kept = self._conn is not None and not self._conn.closed
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=5,
                    application_name=self._name,
                    options=SESSION_OPTIONS,
                )
                self.generation += 1
            return f(self._conn)
        except psycopg.OperationalError as e:
            dropped = kept and self._conn is not None and self._conn.broken
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if dropped:
                return self._call(f)
            raise DatabaseUnavailable(str(e).strip() or type(e).__name__) from e


#: The other nodes that hold a blob, most recently read there first.
_HOLDERS = (
    "SELECT node_url FROM cache_blobs WHERE digest = %s AND node_url <> %s"
    " AND size = %s ORDER BY used DESC LIMIT 3"
)


def _try_lock(
    key: int, digest: str, node_url: str, size: int, conn: psycopg.Connection[Any]
) -> tuple[bool, list[str]]:
    """Take *digest*'s lock: (True, nodes holding the blob), or (False, [the node filling
    it]), or, when its holder no longer fills it (it stores it in the storage tier),
    (False, nodes holding the blob)."""
    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    if got is not None and got[0]:
        conn.execute(
            "INSERT INTO fills (digest, node_url, size) VALUES (%s, %s, %s)"
            " ON CONFLICT (digest) DO UPDATE"
            " SET node_url = EXCLUDED.node_url, size = EXCLUDED.size, started = now()",
            (digest, node_url, size),
        )
        rows = conn.execute(_HOLDERS, (digest, node_url, size)).fetchall()
        return True, [row[0] for row in rows]
    row = conn.execute("SELECT node_url FROM fills WHERE digest = %s", (digest,)).fetchone()
    if row is not None and row[0] != node_url:
        return False, [row[0]]
    # No fill, yet a claim: its holder stores the blob it filled in the storage tier.
    rows = conn.execute(_HOLDERS, (digest, node_url, size)).fetchall()
    return False, [row[0] for row in rows]


def _unlock(key: int, digest: str, node_url: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("DELETE FROM fills WHERE digest = %s AND node_url = %s", (digest, node_url))
    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


@implementer(ICoordinator)
class ClusterCoordinator:
    """The processes of a cache directory (*local*), and the nodes of a cluster above them."""

    def __init__(
        self,
        local: ICoordinator,
        session: Session,
        node_url: str,
        peers: PeerClient,
        reactor: IReactorTime,
        backoff: float = BACKOFF,
    ) -> None:
        self.local = local
        self.shared = local.shared
        self.resumes = True
        self.node_url = node_url
        self._session = session
        self._peers = peers
        self._reactor = reactor
        self._backoff = Backoff(reactor, backoff, "fill coordinator")
        #: Digests whose cluster lock this process holds, and the session they were taken on.
        self._held: dict[str, int] = {}
        #: Digests being led now, and those of them released meanwhile (their fill ended).
        self._leading: set[str] = set()
        self._released: set[str] = set()

    def __repr__(self) -> str:
        held = len(self._held)
        return f"<ClusterCoordinator {self.node_url}: {held} cluster claims over {self.local!r}>"

    # --- the local tier -----------------------------------------------------------

    def claim(self, digest: str) -> bool:
        return bool(self.local.claim(digest))

    def held_elsewhere(self, digest: str) -> bool:
        return bool(self.local.held_elsewhere(digest))

    def pin(self, digest: str) -> bool:
        return bool(self.local.pin(digest))

    def unpin(self, digest: str) -> None:
        self.local.unpin(digest)

    def exclude(self, digest: str) -> bool:
        return bool(self.local.exclude(digest))

    def readmit(self, digest: str) -> None:
        self.local.readmit(digest)

    def read_at(self, digest: str, when: float) -> None:
        self.local.read_at(digest, when)

    def last_read(self, digest: str) -> float | None:
        when = self.local.last_read(digest)
        return None if when is None else float(when)

    def reserve(self, delta: int) -> int:
        return int(self.local.reserve(delta))

    def promise(self, delta: int) -> int:
        return int(self.local.promise(delta))

    def start_usage(self, total: int) -> None:
        self.local.start_usage(total)

    def add_usage(self, delta: int) -> int:
        return int(self.local.add_usage(delta))

    def release(self, digest: str) -> None:
        self.local.release(digest)
        if digest in self._leading:
            self._released.add(digest)
        generation = self._held.pop(digest, None)
        if generation is None or generation != self._session.generation:
            return  # not ours, or gone with its session
        d = self._session.run(partial(_unlock, lock_key(digest), digest, self.node_url))
        d.addErrback(logged(f"releasing the cluster claim on {digest}"))  # or gone with its session

    def close(self) -> None:
        self._held.clear()
        self.local.close()

    # --- the cluster --------------------------------------------------------------

    def lead(self, digest: str, size: int, offset: int = 0) -> Deferred[IResponse | None]:
        return Deferred.fromCoroutine(self._lead(digest, size, offset))

    async def _lead(self, digest: str, size: int, offset: int) -> IResponse | None:
        self._leading.add(digest)
        try:
            response = await self._find(digest, size, offset)
        finally:
            self._leading.discard(digest)
        if digest in self._released:  # the fill ended meanwhile: the claim goes too
            self._released.discard(digest)
            self.release(digest)
            if response is not None:
                discard(response)
            return None
        return response

    async def _find(self, digest: str, size: int, offset: int) -> IResponse | None:
        """Take the claim, or find the node to stream the blob from."""
        key = lock_key(digest)
        for _ in range(LEAD_ATTEMPTS):
            held = self._held.get(digest) == self._session.generation
            try:
                nodes: list[str] = []
                if held:
                    got = True
                else:
                    try_lock = partial(_try_lock, key, digest, self.node_url, size)
                    got, nodes = await self._backoff.run(partial(self._session.run, try_lock))
            except DatabaseUnavailable:  # the outage is logged once, by the backoff
                log.debug("fetching {digest} alone: PostgreSQL is unavailable", digest=digest)
                return None
            if got:
                self._held[digest] = self._session.generation
            for node in nodes:
                response = await self._peers.open(node, digest, size, offset)
                if response is not None:
                    log.info(
                        "filling {digest} from {node} at {offset}",
                        digest=digest,
                        node=node,
                        offset=offset,
                    )
                    return response
            if got:
                return None
            await deferLater(self._reactor, LEAD_INTERVAL, lambda: None)
        log.warn(
            "cannot follow the fill of {digest} on another node: fetching it alone", digest=digest
        )
        return None


def _try_flight(
    key: int, flight: str, recent: float, conn: psycopg.Connection[Any]
) -> tuple[bool, list[str] | None]:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    if row is None or not row[0]:
        return False, None
    left = conn.execute(
        "SELECT result FROM flights WHERE flight = %s AND done > now() - make_interval(secs => %s)",
        (flight, recent),
    ).fetchone()
    if left is None:
        return True, None
    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    return False, _result(left[0])


def _result(value: object) -> list[str] | None:
    """A result from the database, if it is one."""
    if (
        isinstance(value, list)
        and 1 <= len(value) <= FLIGHT_RESULT_MAX
        and all(isinstance(v, str) and len(v) <= RESULT_STRING_MAX for v in value)
    ):
        return value
    return None


def _unlock_flight(
    key: int, flight: str, result: list[str] | None, conn: psycopg.Connection[Any]
) -> None:
    if result is not None:
        conn.execute(
            "INSERT INTO flights (flight, result) VALUES (%s, %s) ON CONFLICT (flight)"
            " DO UPDATE SET result = EXCLUDED.result, done = now()",
            (flight, result),
        )
        conn.execute("DELETE FROM flights WHERE done < now() - interval '1 minute'")
    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


class FlightClaims:
    """Claims on shared flights (:class:`dockmirror.coordination.SharedFlights`) for the
    whole cluster: session advisory locks, like fill claims, so a dead node lets go.

    The holder leaves its result in ``flights`` before it lets go, in order on
    its session, so that a process taking the claim just after takes the result
    instead of doing the work again before the notification reaches it.
    """

    def __init__(self, session: Session, reactor: IReactorTime, backoff: float = BACKOFF) -> None:
        self._session = session
        self._backoff = Backoff(reactor, backoff, "flight claims")
        #: Flights whose lock this process holds, and the session they were taken on.
        self._held: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<FlightClaims: {len(self._held)} held>"

    def claim(self, flight: str, recent: float) -> Deferred[tuple[bool, list[str] | None]]:
        return Deferred.fromCoroutine(self._claim(flight, recent))

    async def _claim(self, flight: str, recent: float) -> tuple[bool, list[str] | None]:
        try_lock = partial(_try_flight, _flight_key(flight), flight, recent)
        try:
            got, left = await self._backoff.run(partial(self._session.run, try_lock))
        except DatabaseUnavailable:
            return True, None  # the node does it alone, as while PostgreSQL is away
        if got:
            self._held[flight] = self._session.generation
        return got, left

    def release(self, flight: str, result: list[str] | None) -> None:
        generation = self._held.pop(flight, None)
        if generation is None or generation != self._session.generation:
            return  # gone with its session
        d = self._session.run(partial(_unlock_flight, _flight_key(flight), flight, result))
        d.addErrback(logged("releasing a flight's cluster claim"))  # or gone with its session


def _flight_key(flight: str) -> int:
    return lock_key(flight) | _FLIGHT_BIT
