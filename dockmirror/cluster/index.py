"""The cache index the nodes of a cluster share, in PostgreSQL.

- ``cache_blobs``: which node holds which verified blob, its size, and when
  it was last read there.  A node claiming a fill asks it first, and copies
  the blob from a node that has it instead of asking the upstream again.
- ``cache_access``: which upstream repository proved it holds which digest
  (see :meth:`dockmirror.cache.blobs.BlobStore.allow`).  A node serves a
  blob through a repository only once that repository proved it has it,
  to this node or to another.  A proof counts while some node holds the
  blob or fills it (``fills``); the filling node records it as soon as the
  upstream answered its GET, so that the nodes and workers following the
  fill need not ask the upstream again.
- ``cache_tags``: what each tag was resolved to, with the manifest, so that a
  tag resolved by one node is fresh on every node until its TTL runs out.
- ``cache_purges``: what the operator purged, and when, kept
  :data:`PURGE_KEEP` seconds.  A purge reaches the other processes by a
  notification at once; a notification may be lost (a process not
  listening, a node down, one of the previous version, whose notifications
  are not signed), so every process also reads the purges recorded after
  the last one its node applied every :data:`PURGE_POLL` seconds, and
  applies those it has not heard of.  The node keeps how far it applied
  them in its own index (``cluster_purges``), so that once restarted it
  applies every purge made while it was down.

Rows about this node's blobs are written on the coordinator's session, in
order with its fill claims: a blob is recorded before its claim ends.
Reads of the last access are batched.  Every node sweeps, hourly, what can
no longer count: tag entries whose TTL ran out (an hour after this node's
TTL, for nodes with a longer one), and proofs of digests that no node holds
or fills, so that neither table grows with every tag and digest ever seen.
The tags are also kept to the ``max_tags`` resolved last, as each process
keeps its own: at each sweep, and each time the process recorded a tenth of
that many (a catch-all upstream answering every tag name asked for).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import psycopg
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import PartialDownloadError, ResponseFailed, readBody

from dockmirror.cache import Cache
from dockmirror.cache.manifests import SharedTag
from dockmirror.cluster.coordinator import Session
from dockmirror.cluster.database import BACKOFF, Backoff, Database, DatabaseUnavailable, logged
from dockmirror.cluster.peers import PeerClient

log = Logger()

#: Seconds between writes of the blobs read meanwhile.
TOUCH_INTERVAL = 10.0
#: Digests whose last access is written at once, at most.
TOUCH_BATCH = 10_000
#: Seconds between sweeps of the rows that can no longer count ...
SWEEP_INTERVAL = 3600.0
#: ... among them tag entries resolved more than this node's TTL and this many seconds ago.
TAG_GRACE = 3600.0
#: The tags beyond ``max_tags`` are dropped each time a process recorded this share of it.
TRIM_SHARE = 0.1
#: Seconds between reads of the purges made by other processes ...
PURGE_POLL = 4.0
#: ... at most this many at a time.
PURGE_BATCH = 1000
#: Seconds a purge is kept in ``cache_purges``: a node down for longer may miss it.
PURGE_KEEP = 30 * 86400.0
#: Seconds after which a purge recorded is visible to all (its insert committed): the
#: position a node keeps moves past it then, never past a purge recorded just now.
PURGE_SETTLED = 10.0
#: Seconds by which a purge may be heard of before it is recorded and still be the same ...
PURGE_SLACK = 5.0
#: ... and seconds a purge heard of is remembered.
PURGE_HEARD = 600.0
#: Seconds between writes of when the purges were last read, if no purge moved the position.
PURGE_POLLED_WRITE = 3600.0


class ClusterIndex(service.Service):
    """This node's part of the shared index, and its view of the others'."""

    def __init__(
        self,
        cache: Cache,
        database: Database,
        session: Session,
        node_url: str,
        reactor: Any,
        backoff: float = BACKOFF,
    ) -> None:
        """*backoff*: seconds without asking PostgreSQL after it failed (``[cluster] backoff``)."""
        self._blobs = cache.blobs
        self._database = database
        self._session = session
        self.node_url = node_url
        self._touched: set[str] = set()
        self._backoff = Backoff(reactor, backoff, "cluster index")
        self._loop = LoopingCall(self._write_touched)
        self._loop.clock = reactor
        self._reactor = reactor
        self._ttl = cache.manifests.ttl
        self._max_tags: int = cache.manifests.max_tags
        #: Tags recorded since the shared table was last kept to ``max_tags``.
        self._published = 0
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor
        #: This process, as the purges it records name it.
        self._origin = secrets.token_hex(8)
        #: The id of the last purge applied on this node, all before it applied too ...
        self._applied = 0
        #: ... when the purges were last read, as written in the node's index ...
        self._polled = 0.0
        #: ... the purges after it applied by this process ...
        self._purges_seen: set[int] = set()
        #: ... and when each repository or digest was last heard of as purged.
        self._purges_heard: dict[str, float] = {}
        self._purge_poll = LoopingCall(self._poll_purges)
        self._purge_poll.clock = reactor
        self._cache = cache
        cache.on_purge.append(self._purged)
        cache.on_purge_heard.append(self._heard)
        #: Reaches the other nodes; set once the node knows the cluster secret.
        self.peers: PeerClient | None = None
        cache.blobs.on_add.append(self._added)
        cache.blobs.on_remove.append(self._touched.discard)
        cache.blobs.on_gone.append(self._removed)
        cache.blobs.on_touch.append(self._touched.add)
        cache.blobs.on_grant.append(self._granted)
        cache.blobs.on_disown.append(self._disowned)
        cache.blobs.proofs_elsewhere = self.proved
        cache.manifests.shared = self

    def __repr__(self) -> str:
        return f"<ClusterIndex {self.node_url}>"

    def startService(self) -> None:
        """Reconcile this node's rows with what its disk holds (see :func:`reconcile_node`),
        and apply the purges made while it was down, before the mirror listens (blocking)."""
        super().startService()
        self._applied, self._polled = self._cache.purges_applied
        away = self._reactor.seconds() - self._polled
        if self._polled and away > PURGE_KEEP:
            log.warn(
                "this node last read the cluster's purges {days:.0f} days ago, and they are"
                " kept {keep:.0f} days: purges made meanwhile may not be applied here",
                days=away / 86400,
                keep=PURGE_KEEP / 86400,
            )
        f = partial(reconcile_node, self.node_url, self._blobs.entries(), self._blobs.path)
        self._write(f, "recording this node's blobs")
        self._loop.start(TOUCH_INTERVAL, now=False)
        self._sweeper.start(SWEEP_INTERVAL, now=False)
        try:
            self._catch_up()
        except (DatabaseUnavailable, psycopg.Error) as e:
            log.warn("cluster index: reading the purges: {error}", error=str(e).strip())
        self._purge_poll.start(PURGE_POLL, now=False)

    def stopService(self) -> Any:
        super().stopService()
        for loop in (self._loop, self._sweeper, self._purge_poll):
            if loop.running:
                loop.stop()

    def _sweep(self) -> None:
        cutoff = self._reactor.seconds() - self._ttl - TAG_GRACE
        self._published = 0
        f = partial(sweep, cutoff, self._max_tags)
        self._run(f, "sweeping expired tags and proofs of blobs gone")

    def _write(self, f: Any, what: str) -> None:
        """*f* on the coordinator's session, in order with its claims."""
        d = Deferred.fromCoroutine(self._backoff.run(partial(self._session.run, f)))
        d.addErrback(logged(f"cluster index: {what}"))

    def _run(self, f: Any, what: str) -> None:
        """*f* on a pooled connection, in no particular order."""
        d = Deferred.fromCoroutine(self._backoff.run(partial(self._database.run, f)))
        d.addErrback(logged(f"cluster index: {what}"))

    # --- blobs -------------------------------------------------------------------

    def _added(self, digest: str, size: int) -> None:
        self._write(
            partial(_execute, _UPSERT_BLOB, (digest, self.node_url, size)), f"recording {digest}"
        )

    def _removed(self, digest: str) -> None:
        """Once the file is gone: a reconcile meanwhile finds the row and keeps it, or
        finds the file gone and deletes the row, never adds it back."""
        self._write(
            partial(_execute, _DELETE_BLOB, (digest, self.node_url)), f"forgetting {digest}"
        )

    def _write_touched(self) -> None:
        if not self._touched:
            return
        digests = list(self._touched)[:TOUCH_BATCH]
        self._touched.difference_update(digests)
        self._write(
            partial(_execute, _TOUCH_BLOBS, (digests, self.node_url)), "recording blob reads"
        )

    # --- proofs ------------------------------------------------------------------

    def _granted(self, origin: str, digest: str) -> None:
        self._run(
            partial(_execute, _INSERT_ACCESS, (origin, digest)), f"recording a proof of {digest}"
        )

    def _disowned(self, origins: set[str]) -> None:
        """A purge: the proofs of *origins* go for every node."""
        f = partial(_execute, _DELETE_ACCESS, (sorted(origins),))
        self._run(f, "forgetting the proofs of purged repositories")

    # --- purges -------------------------------------------------------------------

    def _purged(self, what: str) -> None:
        f = partial(_execute, _INSERT_PURGE, (what, self._origin))
        self._run(f, f"recording the purge of {what}")

    def _purges_after(self) -> Callable[[psycopg.Connection[Any]], list[Any]]:
        """A query of the purges recorded after the last one applied on this node."""
        return partial(_fetch_all, _PURGES, (PURGE_SETTLED, self._applied, PURGE_BATCH))

    def _catch_up(self) -> None:
        """Apply the purges recorded since the last one applied on this node (blocking)."""
        while True:
            applied = self._applied
            rows = self._database.call(self._purges_after())
            self._apply_purges(rows)
            if len(rows) < PURGE_BATCH or self._applied == applied:
                return

    def _poll_purges(self) -> Deferred[None]:
        query = partial(self._database.run, self._purges_after())
        d = Deferred.fromCoroutine(self._backoff.run(query))
        return d.addCallbacks(self._apply_purges, logged("cluster index: reading the purges"))

    def _heard(self, what: str) -> None:
        self._purges_heard[what] = self._reactor.seconds()

    def _apply_purges(self, rows: list[tuple[int, str, str, float, bool]]) -> None:
        """Apply the purges other processes made after the last one applied on this node
        (*rows*, oldest first, each saying whether it is settled) that no notification
        brought here, and move the node's position past those settled."""
        applied, settled_before = self._applied, True
        for purge_id, what, origin, made, settled in rows:
            heard = self._purges_heard.get(what, float("-inf")) >= made - PURGE_SLACK
            if purge_id not in self._purges_seen and origin != self._origin and not heard:
                log.info("applying the purge of {what}, made on another node", what=what)
                self._cache.purged_elsewhere(what)
            self._purges_seen.add(purge_id)
            settled_before = settled_before and settled
            if settled_before:
                applied = purge_id
        now = self._reactor.seconds()
        if applied > self._applied or now - self._polled >= PURGE_POLLED_WRITE:
            self._applied, self._polled = applied, now
            self._purges_seen = {i for i in self._purges_seen if i > applied}
            self._cache.index.write(_RECORD_APPLIED, applied, now, key="cluster_purges")
        cutoff = now - PURGE_HEARD
        for what, when in list(self._purges_heard.items()):
            if when < cutoff:
                del self._purges_heard[what]

    async def proved(self, origin: str, digest: str) -> int | None:
        """The size of *digest* if *origin* proved it has it to some node; else None."""
        try:
            query = partial(_fetch_one, _PROVED, (origin, digest))
            row = await self._backoff.run(partial(self._database.run, query))
        except DatabaseUnavailable:
            return None
        return int(row[0]) if row is not None else None

    # --- tags --------------------------------------------------------------------

    async def manifest(self, digest: str, limit: int) -> bytes | None:
        """The manifest *digest*, of *limit* bytes at most, from a node that holds it."""
        if self.peers is None:
            return None
        try:
            query = partial(_fetch_all, _MANIFEST_HOLDERS, (digest, self.node_url, limit))
            rows = await self._backoff.run(partial(self._database.run, query))
        except DatabaseUnavailable:
            return None
        for node, size in rows:
            response = await self.peers.open(str(node), digest, int(size), 0)
            if response is None:
                continue
            try:
                body: bytes = await readBody(response)
            except (ResponseFailed, PartialDownloadError) as e:
                log.info(
                    "node {node} cannot send {digest}: {error}", node=node, digest=digest, error=e
                )
                continue
            return body
        return None

    async def tags(self, origin: str, tag: str, since: float) -> list[SharedTag]:
        try:
            query = partial(_fetch_all, _TAGS, (origin, tag, since))
            rows = await self._backoff.run(partial(self._database.run, query))
        except DatabaseUnavailable:
            return []
        return [(str(m), str(d), bytes(b), float(r)) for m, d, b, r in rows]

    def publish(
        self, origin: str, tag: str, media_type: str, digest: str, body: bytes, resolved: float
    ) -> None:
        row = (origin, tag, media_type, digest, body, resolved)
        self._run(partial(_execute, _UPSERT_TAG, row), f"recording tag {tag}")
        self._published += 1
        if self._published >= max(self._max_tags * TRIM_SHARE, 1):
            self._published = 0
            self._run(partial(trim_tags, self._max_tags), "dropping the tags beyond max_tags")

    def expire(self, origin: str, tag: str, keep: str, expired: float) -> None:
        self._run(partial(_execute, _EXPIRE_TAG, (expired, origin, tag, keep)), f"expiring {tag}")

    def forget(self, origins: Iterable[str], tag: str | None = None) -> None:
        if tag is None:
            f = partial(_execute, _FORGET_ORIGINS, (list(origins),))
        else:
            f = partial(_execute, _FORGET_TAG, (list(origins), tag))
        self._run(f, "forgetting tags")


_UPSERT_BLOB = (
    "INSERT INTO cache_blobs (digest, node_url, size) VALUES (%s, %s, %s)"
    " ON CONFLICT (digest, node_url) DO UPDATE SET size = EXCLUDED.size, used = now()"
)
_DELETE_BLOB = "DELETE FROM cache_blobs WHERE digest = %s AND node_url = %s"
_TOUCH_BLOBS = "UPDATE cache_blobs SET used = now() WHERE digest = ANY(%s) AND node_url = %s"
_MANIFEST_HOLDERS = (
    "SELECT node_url, size FROM cache_blobs WHERE digest = %s AND node_url <> %s AND size <= %s"
    " ORDER BY used DESC LIMIT 3"
)
_INSERT_ACCESS = "INSERT INTO cache_access VALUES (%s, %s) ON CONFLICT DO NOTHING"
_DELETE_ACCESS = "DELETE FROM cache_access WHERE origin = ANY(%s)"
_PROVED = (
    "SELECT h.size FROM cache_access a JOIN"
    " (SELECT digest, size FROM cache_blobs UNION ALL SELECT digest, size FROM fills) h"
    " ON h.digest = a.digest WHERE a.origin = %s AND a.digest = %s LIMIT 1"
)
_TAGS = (
    "SELECT media_type, digest, manifest, resolved FROM cache_tags"
    " WHERE origin = %s AND tag = %s AND resolved > %s"
)
_UPSERT_TAG = (
    "INSERT INTO cache_tags VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (origin, tag, media_type) DO UPDATE SET digest = EXCLUDED.digest,"
    " manifest = EXCLUDED.manifest, resolved = EXCLUDED.resolved"
    " WHERE cache_tags.resolved <= EXCLUDED.resolved"
)
_EXPIRE_TAG = (
    "UPDATE cache_tags SET resolved = LEAST(resolved, %s)"
    " WHERE origin = %s AND tag = %s AND media_type <> %s"
)
_FORGET_TAG = "DELETE FROM cache_tags WHERE origin = ANY(%s) AND tag = %s"
_FORGET_ORIGINS = "DELETE FROM cache_tags WHERE origin = ANY(%s)"


_INSERT_PURGE = "INSERT INTO cache_purges (what, origin) VALUES (%s, %s)"
_PURGES = (
    "SELECT id, what, origin, extract(epoch FROM made)::float8,"
    " made < now() - make_interval(secs => %s) FROM cache_purges"
    " WHERE id > %s ORDER BY id LIMIT %s"
)
#: In the node's own index (SQLite), shared by its processes.
_RECORD_APPLIED = (
    "INSERT INTO cluster_purges VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE"
    " SET applied = max(applied, excluded.applied), polled = max(polled, excluded.polled)"
)


_SWEEP_TAGS = "DELETE FROM cache_tags WHERE resolved < %s"
_TRIM_TAGS = (
    "DELETE FROM cache_tags t USING (SELECT origin, tag FROM cache_tags GROUP BY origin, tag"
    " ORDER BY max(resolved) DESC OFFSET %s) old WHERE t.origin = old.origin AND t.tag = old.tag"
)
_SWEEP_PURGES = f"DELETE FROM cache_purges WHERE made < now() - interval '{PURGE_KEEP:.0f} seconds'"
_SWEEP_ACCESS = (
    "DELETE FROM cache_access a"
    " WHERE NOT EXISTS (SELECT 1 FROM cache_blobs b WHERE b.digest = a.digest)"
    " AND NOT EXISTS (SELECT 1 FROM fills f WHERE f.digest = a.digest)"
)


def sweep(cutoff: float, max_tags: int, conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """Delete tag entries resolved before *cutoff* or beyond *max_tags* tags, and proofs of
    digests no node holds or fills.

    Returns how many of each went.
    """
    tags = conn.execute(_SWEEP_TAGS, (cutoff,)).rowcount + trim_tags(max_tags, conn)
    proofs = conn.execute(_SWEEP_ACCESS).rowcount
    conn.execute(_SWEEP_PURGES)
    if tags or proofs:
        log.info(
            "cluster index: swept {tags} expired tag entries and {proofs} proofs of blobs gone",
            tags=tags,
            proofs=proofs,
        )
    return tags, proofs


def trim_tags(max_tags: int, conn: psycopg.Connection[Any]) -> int:
    """Delete the entries of all tags but the *max_tags* resolved last; returns how many went."""
    return int(conn.execute(_TRIM_TAGS, (max_tags,)).rowcount)


def _execute(sql: str, params: tuple[Any, ...], conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql, params)


def _fetch_one(sql: str, params: tuple[Any, ...], conn: psycopg.Connection[Any]) -> Any:
    return conn.execute(sql, params).fetchone()


def _fetch_all(sql: str, params: tuple[Any, ...], conn: psycopg.Connection[Any]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def reconcile_node(
    node_url: str,
    blobs: list[tuple[str, int]],
    path: Callable[[str], str],
    conn: psycopg.Connection[Any],
) -> tuple[int, int]:
    """Make *node_url*'s rows say what its disk holds now, *blobs* being what a process
    found there at its start (each blob's file at ``path(digest)``).

    The other processes of the node go on adding, reading and removing blobs
    meanwhile, and write their rows themselves: only rows whose file is gone
    are deleted, and only blobs still on disk and without a row are added, so
    that neither a blob removed since the start comes back nor a row's last
    access is lost.  Returns how many rows were added and deleted.
    """
    with conn.transaction():
        rows = {
            str(row[0])
            for row in conn.execute(
                "SELECT digest FROM cache_blobs WHERE node_url = %s FOR UPDATE", (node_url,)
            )
        }
        gone = [digest for digest in rows if not os.path.exists(path(digest))]
        added = [
            (digest, node_url, size)
            for digest, size in blobs
            if digest not in rows and os.path.exists(path(digest))
        ]
        conn.execute(
            "DELETE FROM cache_blobs WHERE node_url = %s AND digest = ANY(%s)", (node_url, gone)
        )
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO cache_blobs (digest, node_url, size) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                added,
            )
    return len(added), len(gone)
