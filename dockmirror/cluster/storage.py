"""The storage bucket's records in the cluster's PostgreSQL: one quota, one LRU, leases.

With ``[cluster] database`` and ``[storage] backend = "s3"``, the nodes
share one bucket and these records (``storage.sql``):

- ``storage_objects``: every object of the bucket, its size and last read
  by any node.  They alone say whether the bucket holds a blob: a node
  reads from the bucket only what is recorded, and records what it stores
  before its claim on the digest ends.
- ``storage_uploads``: the bytes each upload in progress reserved, counted
  in the quota until it ends (or, for a node that died, its lease lapses).
- ``storage_listing``: when a node last began to list the bucket, and how
  many listings failed in a row.  The records are trusted at start: one
  node a day lists the bucket and reconciles them (a listing costs one
  request per 1000 objects); after a failure, one node tries again within
  minutes, then less often (:func:`~dockmirror.storage.quota.listing_delay`).
- ``storage_readers``: leases of the nodes reading an object (a stream, a
  fill from the bucket, a presigned URL handed out), renewed while they read.

**What eviction guarantees.**  An object is deleted only by a node that,
in one transaction under the cluster's quota lock, found it recorded, found
no live lease on it, found its digest's fill claim free, and then took that
claim and deleted its record.  A reader takes its lease in a transaction
that marks the record used, so one of the two waits for the other: either
the reader sees no record (and reads elsewhere), or the evictor sees the
lease.  The claim held until the object is deleted keeps any node from
storing the digest again meanwhile.  Uploads are never evicted: they are
not objects until complete.  A node that dies stops renewing its leases,
which lapse after :data:`LEASE` seconds.

**One upload per digest.**  A node uploads a blob only while it holds the
digest's fill claim (the advisory lock of
:mod:`dockmirror.cluster.coordinator`, taken once more on the same session,
so that the claim outlasts the fill until the upload ends), and only if the
digest is not recorded.

Every query runs on the coordinator's session, in order with its claims.
While PostgreSQL is away, reads from the bucket go on without leases (no
node can evict meanwhile), and nothing is uploaded; the outage is logged
as it begins and as it ends, not at each lease or renewal that fails.
"""

from __future__ import annotations

import os
from collections import Counter
from functools import partial
from typing import Any

import psycopg
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from dockmirror._interfaces import IStorageRecords
from dockmirror.cluster.coordinator import Session, lock_key
from dockmirror.cluster.database import (
    BACKOFF,
    Backoff,
    DatabaseUnavailable,
    locked_transaction,
)
from dockmirror.storage.quota import listing_delay

log = Logger()

#: Seconds a lease (of a reader, or an upload's reservation) lasts unless renewed ...
LEASE = 60
#: ... and seconds between renewals.
RENEW_INTERVAL = 15.0
#: Objects looked at, least recently used first, to make room at once.
CANDIDATES = 1000
#: What :meth:`ClusterRecords.lease` says when PostgreSQL cannot tell: ask the bucket.
UNKNOWN = -1
#: The transaction-level advisory lock that makes quota decisions one at a time.
_QUOTA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('dockmirror-storage-quota'))"


class _Skip(Exception):
    """Why a blob is not to be uploaded."""


@implementer(IStorageRecords)
class ClusterRecords(service.Service):
    """This node's view of the bucket's records in PostgreSQL."""

    shared = True

    def __init__(
        self,
        session: Session,
        node_url: str,
        reactor: Any,
        max_size: int | None,
        backoff: float = BACKOFF,
    ) -> None:
        self._session = session
        #: Who holds this process's leases and reservations: each worker of a node is one.
        self.holder = f"{node_url}#{os.getpid()}"
        self.max_size = max_size
        self._backoff = Backoff(reactor, backoff, "storage records")
        #: Readers on this node, by digest.
        self._readers: Counter[str] = Counter()
        #: Uploads this node reserved room for.
        self._uploading: set[str] = set()
        #: Objects stored while PostgreSQL was away, recorded once it is back.
        self._unrecorded: dict[str, int] = {}
        self._stats: dict[str, int] = {"objects": 0, "size": 0}
        self._loop = LoopingCall(self._renew)
        self._loop.clock = reactor

    def __repr__(self) -> str:
        return f"<ClusterRecords {self._stats['objects']} objects, {self._stats['size']} bytes>"

    def startService(self) -> None:
        super().startService()
        # What this node leased or reserved in an earlier life is over.
        self._write(partial(_forget_node, self.holder), "starting")
        self._loop.start(RENEW_INTERVAL, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    async def _query(self, f: Any) -> Any:
        return await self._backoff.run(partial(self._session.run, f))

    def _write(self, f: Any, what: str) -> Deferred[Any]:
        d = Deferred.fromCoroutine(self._query(f))

        def failed(failure: Any) -> None:
            failure.trap(DatabaseUnavailable, psycopg.Error)
            if failure.check(psycopg.Error):  # an outage is logged once, by the backoff
                _warn(what, failure.value)

        return d.addErrback(failed)

    # --- reading -----------------------------------------------------------------

    def load(self, objects: Any) -> None:
        """The cluster's records are in PostgreSQL, not in this node's index."""

    def lease(self, digest: str) -> Deferred[int | None]:
        self._readers[digest] += 1
        return Deferred.fromCoroutine(self._lease(digest))

    async def _lease(self, digest: str) -> int | None:
        try:
            size: int | None = await self._query(partial(_lease, digest, self.holder))
        except DatabaseUnavailable:
            return UNKNOWN
        except psycopg.Error as e:
            _warn(f"leasing {digest}", e)
            return UNKNOWN
        return size

    def release(self, digest: str) -> None:
        self._readers[digest] -= 1
        if self._readers[digest] > 0:
            return
        del self._readers[digest]
        f = partial(_execute, _DELETE_LEASE, (digest, self.holder))
        self._write(f, f"ending the lease on {digest}")

    def in_use(self, digest: str) -> bool:
        return bool(self._readers[digest])

    def found(self, digest: str, size: int) -> None:
        """Only what is recorded is read: nothing to learn."""

    def forget(self, digest: str) -> None:
        self._write(partial(_execute, _DELETE_OBJECT, (digest,)), f"forgetting {digest}")

    # --- writing -----------------------------------------------------------------

    def reserve(self, digest: str, size: int) -> Deferred[list[str] | str]:
        return Deferred.fromCoroutine(self._reserve(digest, size))

    async def _reserve(self, digest: str, size: int) -> list[str] | str:
        f = partial(_reserve, digest, size, self.holder, self.max_size)
        try:
            reserved: list[str] | str = await self._query(f)
        except (DatabaseUnavailable, psycopg.Error) as e:
            return f"the cluster database is unavailable ({e})"
        if not isinstance(reserved, str):
            self._uploading.add(digest)
        return reserved

    def uploaded(self, digest: str, size: int, stored: bool) -> None:
        self._uploading.discard(digest)
        Deferred.fromCoroutine(self._uploaded(digest, size, stored))

    async def _uploaded(self, digest: str, size: int, stored: bool) -> None:
        try:
            await self._query(partial(_uploaded, digest, size, self.holder, stored))
        except (DatabaseUnavailable, psycopg.Error) as e:
            if not isinstance(e, DatabaseUnavailable):
                _warn(f"recording {digest}", e)
            if stored:  # recorded by a later renewal
                self._unrecorded[digest] = size

    def remove(self, digest: str) -> Deferred[bool]:
        d = self._write(partial(_remove, digest), f"removing {digest}")
        return d.addCallback(bool)

    def evicted(self, digest: str) -> None:
        self._write(partial(_unlock, digest), f"releasing {digest}")

    def listing_due(self) -> Deferred[int | None]:
        """Whether no node of the cluster began to list the bucket for a day (or for
        minutes after a failed listing); if so this node does.

        Not while PostgreSQL is away: the listing could not be recorded.
        """
        return self._write(_listing_due, "asking whether to list the bucket")

    def listed(self) -> None:
        self._write(partial(_execute, _LISTED, ()), "recording a listing")

    def reconcile(self, found: dict[str, tuple[int, float]], since: float) -> Deferred[list[str]]:
        """Fails if PostgreSQL is away: the listing failed, to be made again soon."""
        return Deferred.fromCoroutine(self._query(partial(_reconcile, found, since, self.max_size)))

    # --- upkeep ------------------------------------------------------------------

    def _renew(self) -> Deferred[Any]:
        unrecorded = dict(self._unrecorded)
        f = partial(_renew, list(self._readers), self.holder, unrecorded)
        d = self._write(f, "renewing leases")

        def renewed(stats: tuple[int, int] | None) -> None:
            if stats is not None:
                self._stats = {"objects": stats[0], "size": stats[1]}
                for digest in unrecorded:
                    self._unrecorded.pop(digest, None)

        return d.addCallback(renewed)

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)


_LISTED = "UPDATE storage_listing SET failures = 0"
_DELETE_LEASE = "DELETE FROM storage_readers WHERE digest = %s AND node_url = %s"
_DELETE_OBJECT = "DELETE FROM storage_objects WHERE digest = %s"
_UPSERT_LEASE = (
    "INSERT INTO storage_readers (digest, node_url, expires)"
    f" VALUES (%s, %s, now() + interval '{LEASE} seconds')"
    " ON CONFLICT (digest, node_url) DO UPDATE SET expires = EXCLUDED.expires"
)
_RECORD = (
    "INSERT INTO storage_objects (digest, size) VALUES (%s, %s)"
    " ON CONFLICT (digest) DO UPDATE SET size = EXCLUDED.size, used = now(), stored = now()"
)
_LIVE_READER = (
    "EXISTS (SELECT 1 FROM storage_readers r WHERE r.digest = o.digest AND r.expires > now())"
)
#: The advisory lock keys held now by any session (fill claims, evictions, uploads).
_HELD_KEYS = (
    "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks"
    " WHERE locktype = 'advisory' AND objsubid = 1 AND granted"
)


def _warn(what: str, error: BaseException) -> None:
    log.warn("storage records: {what}: {error}", what=what, error=str(error).strip())


def _execute(sql: str, params: tuple[Any, ...], conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql, params)


def _forget_node(node_url: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("DELETE FROM storage_readers WHERE node_url = %s", (node_url,))
    conn.execute("DELETE FROM storage_uploads WHERE node_url = %s", (node_url,))


def _lease(digest: str, node_url: str, conn: psycopg.Connection[Any]) -> int | None:
    """Mark *digest* used and lease it, in one transaction; its size, or None if not recorded."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE storage_objects SET used = now() WHERE digest = %s RETURNING size", (digest,)
        ).fetchone()
        if row is None:
            return None
        conn.execute(_UPSERT_LEASE, (digest, node_url))
    return int(row[0])


def _try_lock(digest: str, conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(digest),)).fetchone()
    return bool(row and row[0])


def _unlock(digest: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(digest),))


def _evictable(
    conn: psycopg.Connection[Any], candidates: list[tuple[str, int]], excess: int
) -> list[str] | None:
    """Of *candidates* (least recently used first, their records locked), those to delete
    to free *excess* bytes: not read, not claimed; None if they are not enough.

    Each one's claim is taken (and held until :func:`_unlock`).
    """
    digests = [digest for digest, _ in candidates]
    # Locked now: a reader that leased one meanwhile has committed, and is seen.
    read = {
        row[0]
        for row in conn.execute(
            "SELECT digest FROM storage_readers WHERE digest = ANY(%s) AND expires > now()",
            (digests,),
        )
    }
    held = {row[0] for row in conn.execute(_HELD_KEYS)}
    victims: list[str] = []
    for digest, size in candidates:
        if excess <= 0:
            break
        if digest in read or lock_key(digest) in held or not _try_lock(digest, conn):
            continue
        victims.append(digest)
        excess -= size
    if excess > 0:
        for digest in victims:
            _unlock(digest, conn)
        return None
    return victims


def _make_room(
    conn: psycopg.Connection[Any], needed: int, max_size: int | None
) -> list[str] | None:
    """Choose and forget the objects to delete for *needed* more bytes (in a transaction)."""
    if max_size is None:
        return []
    row = conn.execute(
        "SELECT (SELECT COALESCE(SUM(size), 0) FROM storage_objects)"
        " + (SELECT COALESCE(SUM(size), 0) FROM storage_uploads WHERE expires > now())"
    ).fetchone()
    excess = int(row[0]) + needed - max_size if row is not None else 0
    if excess <= 0:
        return []
    candidates = conn.execute(
        f"SELECT digest, size FROM storage_objects o WHERE NOT {_LIVE_READER}"
        " ORDER BY used LIMIT %s FOR UPDATE SKIP LOCKED",
        (CANDIDATES,),
    ).fetchall()
    victims = _evictable(conn, [(str(d), int(s)) for d, s in candidates], excess)
    if victims:
        conn.execute("DELETE FROM storage_objects WHERE digest = ANY(%s)", (victims,))
    return victims


def _reserve(
    digest: str, size: int, node_url: str, max_size: int | None, conn: psycopg.Connection[Any]
) -> list[str] | str:
    """Take *digest*'s claim once more (this node holds it for its fill) and reserve room."""
    if not _try_lock(digest, conn):
        return "another node holds its claim"
    victims: list[str] | None = []
    try:
        with conn.transaction():
            conn.execute(_QUOTA_LOCK)
            if conn.execute(
                "SELECT 1 FROM storage_objects WHERE digest = %s", (digest,)
            ).fetchone():
                raise _Skip("stored already")
            victims = _make_room(conn, size, max_size)
            if victims is None:
                raise _Skip("the storage quota is full of blobs in use")
            # Whoever reserved it before held the claim before, and is gone.
            conn.execute("DELETE FROM storage_uploads WHERE digest = %s", (digest,))
            conn.execute(
                "INSERT INTO storage_uploads (digest, node_url, size, expires)"
                f" VALUES (%s, %s, %s, now() + interval '{LEASE} seconds')",
                (digest, node_url, size),
            )
    except _Skip as e:
        _unlock(digest, conn)
        return str(e)
    except BaseException:
        for victim in victims or []:
            _unlock(victim, conn)
        _unlock(digest, conn)
        raise
    return victims


def _uploaded(
    digest: str, size: int, node_url: str, stored: bool, conn: psycopg.Connection[Any]
) -> None:
    """Record a stored object (before its claim ends), end the reservation and the claim."""
    try:
        with conn.transaction():
            if stored:
                conn.execute(_RECORD, (digest, size))
            conn.execute(
                "DELETE FROM storage_uploads WHERE digest = %s AND node_url = %s",
                (digest, node_url),
            )
    finally:
        _unlock(digest, conn)


def _remove(digest: str, conn: psycopg.Connection[Any]) -> bool:
    """Forget *digest*, unless some node reads or fills it; its claim is taken if so."""
    with conn.transaction():
        conn.execute("SELECT 1 FROM storage_objects WHERE digest = %s FOR UPDATE", (digest,))
        # Not recorded, it may still be in the bucket: deleted all the same.
        victims = _evictable(conn, [(digest, 1)], 1)
        if not victims:
            return False
        conn.execute(_DELETE_OBJECT, (digest,))
    return True


def _listing_due(conn: psycopg.Connection[Any]) -> int | None:
    """None if a node began to list the bucket less than :func:`listing_delay` ago; else
    the listings that failed in a row, and the bucket is to be listed now (counted as
    failed until :data:`_LISTED`)."""
    with locked_transaction(conn, "dockmirror-storage-listing"):
        row = conn.execute(
            "SELECT extract(epoch FROM now() - listed), failures FROM storage_listing"
        ).fetchone()
        if row is not None and float(row[0]) < listing_delay(int(row[1])):
            return None
        conn.execute(
            "INSERT INTO storage_listing (id, listed, failures) VALUES (1, now(), 1)"
            " ON CONFLICT (id) DO UPDATE"
            " SET listed = now(), failures = storage_listing.failures + 1"
        )
    return 0 if row is None else int(row[1])


def _reconcile(
    found: dict[str, tuple[int, float]],
    since: float,
    max_size: int | None,
    conn: psycopg.Connection[Any],
) -> list[str]:
    """Record what a listing of the bucket found; forget what it did not, unless it was
    stored after the listing began or is read now; make the objects fit the quota."""
    with conn.transaction():
        conn.execute(_QUOTA_LOCK)
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO storage_objects (digest, size, used, stored)"
                " VALUES (%s, %s, to_timestamp(%s), to_timestamp(%s)) ON CONFLICT DO NOTHING",
                [(d, size, modified, modified) for d, (size, modified) in found.items()],
            )
        conn.execute(
            "DELETE FROM storage_objects o WHERE NOT (digest = ANY(%s))"
            f" AND stored < to_timestamp(%s) - interval '{LEASE} seconds' AND NOT {_LIVE_READER}",
            (list(found), since),
        )
        return _make_room(conn, 0, max_size) or []


def _renew(
    digests: list[str], node_url: str, unrecorded: dict[str, int], conn: psycopg.Connection[Any]
) -> tuple[int, int]:
    """Renew this node's leases and reservations, record what could not be; the totals."""
    with conn.transaction():
        with conn.cursor() as cursor:
            cursor.executemany(_UPSERT_LEASE, [(digest, node_url) for digest in digests])
            cursor.executemany(_RECORD, list(unrecorded.items()))
        conn.execute(
            f"UPDATE storage_uploads SET expires = now() + interval '{LEASE} seconds'"
            " WHERE node_url = %s",
            (node_url,),
        )
        conn.execute("DELETE FROM storage_readers WHERE expires < now()")
        conn.execute("DELETE FROM storage_uploads WHERE expires < now()")
    row = conn.execute("SELECT count(*), COALESCE(SUM(size), 0) FROM storage_objects").fetchone()
    return (int(row[0]), int(row[1])) if row is not None else (0, 0)
