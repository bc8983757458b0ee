"""The storage bucket's records in PostgreSQL: one quota for the cluster, leases, claims.

Each connection plays one node's session (the one its fill claims are on).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from importlib import resources
from typing import Any

import psycopg
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from dockmirror.cluster import storage
from dockmirror.cluster.coordinator import lock_key
from dockmirror.cluster.database import DatabaseUnavailable
from dockmirror.storage.quota import LISTING_RETRY, LISTING_RETRY_MAX

A, B = "http://a:1", "http://b:1"


def digest(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


@pytest.fixture
def sessions(postgres: str) -> Iterator[tuple[psycopg.Connection[Any], psycopg.Connection[Any]]]:
    with (
        psycopg.connect(postgres, autocommit=True) as a,
        psycopg.connect(postgres, autocommit=True) as b,
    ):
        a.execute(resources.files("dockmirror.cluster").joinpath("storage.sql").read_text())
        yield a, b


def store(conn: psycopg.Connection[Any], node: str, d: str, size: int, max_size: int) -> Any:
    """Upload *d* as its claim holder would: the victims, or why not."""
    reserved = storage._reserve(d, size, node, max_size, conn)
    if isinstance(reserved, list):
        storage._uploaded(d, size, node, True, conn)
        for victim in reserved:  # deleted from the bucket
            storage._unlock(victim, conn)
    return reserved


def held(conn: psycopg.Connection[Any], d: str) -> bool:
    """Whether any session holds *d*'s claim (asked from another one)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(d),)).fetchone()
    assert row is not None
    if row[0]:
        conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(d),))
    return not row[0]


def objects(conn: psycopg.Connection[Any]) -> set[str]:
    return {row[0] for row in conn.execute("SELECT digest FROM storage_objects")}


def test_the_quota_is_the_clusters_and_evicts_the_least_recently_used_of_any_node(sessions):
    a, b = sessions
    assert store(a, A, digest(1), 400, 1000) == []
    assert store(b, B, digest(2), 400, 1000) == []
    assert storage._lease(digest(1), B, b) == 400  # read on B: the most recently used now
    storage._execute(storage._DELETE_LEASE, (digest(1), B), b)
    assert store(a, A, digest(3), 400, 1000) == [digest(2)]
    assert objects(a) == {digest(1), digest(3)}
    assert storage._renew([], A, {}, a) == (2, 800)


def test_an_object_read_on_any_node_or_claimed_is_never_evicted(sessions, postgres):
    a, b = sessions
    for n in (1, 2):
        assert store(a, A, digest(n), 400, 1000) == []
    assert storage._lease(digest(1), B, b) == 400  # B streams it
    with psycopg.connect(postgres, autocommit=True) as c:
        assert c.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(digest(2)),)).fetchone()
        # 1 is read, 2 is being filled: no room.
        assert store(a, A, digest(3), 400, 1000) == "the storage quota is full of blobs in use"
        assert not held(b, digest(3))
    # The lease lapses (its node died): 1 may go.
    b.execute("UPDATE storage_readers SET expires = now() - interval '1 second'")
    victims = storage._reserve(digest(3), 400, A, 1000, a)
    assert victims in ([digest(1)], [digest(2)])
    # The victim's claim is held until it is deleted: no node fills it again meanwhile.
    assert held(b, victims[0])
    storage._unlock(victims[0], a)
    assert not held(b, victims[0])
    # A reader coming after the choice finds no record, so never reads what goes.
    assert storage._lease(victims[0], B, b) is None


def test_one_upload_per_digest_under_the_claim_which_outlasts_the_fill(sessions):
    a, b = sessions
    d = digest(7)
    key = lock_key(d)
    assert a.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)  # A's fill
    assert storage._reserve(d, 10, B, None, b) == "another node holds its claim"
    assert storage._reserve(d, 10, A, None, a) == []
    a.execute("SELECT pg_advisory_unlock(%s)", (key,))  # A's fill ends, its upload goes on
    assert held(b, d)
    assert storage._renew([], B, {}, b) == (0, 0)
    row = b.execute("SELECT node_url, size FROM storage_uploads").fetchone()
    assert row == (A, 10)  # counted in the quota
    storage._uploaded(d, 10, A, True, a)
    assert not held(b, d)
    assert objects(b) == {d}
    assert storage._reserve(d, 10, B, None, b) == "stored already"
    assert not held(a, d)


def test_a_listing_records_what_it_finds_and_forgets_what_is_gone(sessions):
    a, b = sessions
    assert store(a, A, digest(1), 100, 10_000) == []
    a.execute("UPDATE storage_objects SET stored = now() - interval '1 hour'")
    assert store(a, A, digest(2), 100, 10_000) == []  # stored while listing
    row = a.execute("SELECT extract(epoch FROM now())").fetchone()
    assert row is not None
    now = float(row[0])
    found = {digest(3): (300, now - 7200), digest(4): (300, now - 3600)}
    assert storage._reconcile(found, now - 10, 500, a) == [digest(3)]
    assert objects(a) == {digest(2), digest(4)}
    assert held(b, digest(3))
    storage._unlock(digest(3), a)


def test_an_operator_removes_only_what_nobody_reads(sessions):
    a, b = sessions
    assert store(a, A, digest(1), 100, 1000) == []
    assert storage._lease(digest(1), B, b) == 100
    assert not storage._remove(digest(1), a)
    storage._execute(storage._DELETE_LEASE, (digest(1), B), b)
    assert storage._remove(digest(1), a)
    assert objects(b) == set()
    storage._unlock(digest(1), a)


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_one_node_a_day_lists_the_bucket(sessions):
    """The first node to ask lists the bucket; the others trust the records until a
    day has passed."""
    a, b = sessions
    assert storage._listing_due(a) == 0
    assert storage._listing_due(b) is None
    storage._execute(storage._LISTED, (), a)
    assert storage._listing_due(a) is None
    a.execute("UPDATE storage_listing SET listed = now() - interval '2 hours'")
    assert storage._listing_due(b) is None
    a.execute("UPDATE storage_listing SET listed = now() - interval '25 hours'")
    assert storage._listing_due(b) == 0
    assert storage._listing_due(a) is None


def test_a_failed_listing_is_made_again_by_any_node_within_minutes_then_less_often(sessions):
    """A listing counts as failed until it is said to have ended well, so that one
    whose node died is made again too."""
    a, b = sessions

    def began(seconds_ago: int) -> None:
        a.execute(
            "UPDATE storage_listing SET listed = now() - make_interval(secs => %s)",
            (seconds_ago,),
        )

    assert storage._listing_due(a) == 0  # fails: never said to have ended well
    began(LISTING_RETRY - 1)
    assert storage._listing_due(b) is None
    began(LISTING_RETRY + 1)
    assert storage._listing_due(b) == 1  # fails too
    began(LISTING_RETRY + 1)
    assert storage._listing_due(a) is None  # ten minutes now
    began(2 * LISTING_RETRY + 1)
    assert storage._listing_due(a) == 2
    for _ in range(10):
        began(LISTING_RETRY_MAX + 1)
        assert storage._listing_due(b) is not None  # hourly at most
    storage._execute(storage._LISTED, (), b)
    began(LISTING_RETRY_MAX + 1)
    assert storage._listing_due(a) is None  # daily again


class Outage:
    """A node's session to a PostgreSQL that is down until told otherwise."""

    def __init__(self) -> None:
        self.down = True
        self.queries = 0

    def run(self, f: Any) -> Deferred[Any]:
        self.queries += 1
        if self.down:
            return fail(DatabaseUnavailable("connection refused"))
        return succeed(None)


def test_an_outage_is_logged_once_as_it_begins_and_once_as_it_ends():
    """Not a warning per lease or renewal while PostgreSQL is down."""
    clock = Clock()
    session = Outage()
    records = storage.ClusterRecords(session, A, clock, None)  # type: ignore[arg-type]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        records.startService()
        for n in range(10):  # leases and renewals, for minutes
            assert result_of(records.lease(digest(n))) == storage.UNKNOWN
            clock.advance(storage.RENEW_INTERVAL)
        session.down = False
        clock.advance(storage.RENEW_INTERVAL)
        session.down = True
        clock.advance(storage.RENEW_INTERVAL)
        records.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [
        (e["log_level"], formatEvent(e))
        for e in events
        if e.get("log_namespace") != "twisted.internet.defer"
    ]
    assert session.queries > 10
    assert said == [
        (
            LogLevel.warn,
            "storage records: PostgreSQL is unavailable (connection refused); asking it again"
            " every 5s at most, without a warning until it is back",
        ),
        (LogLevel.info, "storage records: PostgreSQL is back"),
        (
            LogLevel.warn,
            "storage records: PostgreSQL is unavailable (connection refused); asking it again"
            " every 5s at most, without a warning until it is back",
        ),
    ]
