"""The pieces of the cluster's cache: keys, ranges, the secret file, the shared index's sweep."""

from __future__ import annotations

from importlib import resources
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from dockmirror.cluster.coordinator import (
    LEAD_ATTEMPTS,
    LEAD_INTERVAL,
    ClusterCoordinator,
    _try_lock,
    _unlock,
    lock_key,
)
from dockmirror.cluster.database import BACKOFF, Backoff, DatabaseUnavailable
from dockmirror.cluster.peers import NODE_URL_RE, SecretError, read_secret_file
from dockmirror.coordination import LocalCoordinator
from dockmirror.streaming import content_range_start

DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_lock_keys_come_from_the_digest_and_stay_clear_of_hashtext_keys():
    assert lock_key(DIGEST) == int("0123456789abcde", 16) | 1 << 60
    assert lock_key("sha256:" + "0" * 64) >= 1 << 60 > 2**31  # hashtext() is 32 bits
    assert lock_key("sha256:" + "f" * 64) < 2**63  # a bigint


class Answer:
    def __init__(self, *content_range: bytes) -> None:
        self.headers = Headers({b"content-range": list(content_range)} if content_range else {})


@pytest.mark.parametrize(
    ("header", "start"),
    [
        ((b"bytes 100-999/1000",), 100),
        ((b"bytes 0-999/1000",), 0),
        ((b"bytes 100-998/1000",), None),  # not the rest
        ((b"bytes 100-999/1001",), None),  # another size
        ((b"bytes 100-999/*",), None),
        ((b"bytes */1000",), None),
        ((), None),
    ],
)
def test_a_partial_answer_must_be_the_rest_of_the_blob(header, start):
    assert content_range_start(Answer(*header), 1000) == start  # type: ignore[arg-type]


def test_the_secret_file_holds_one_long_enough_line(tmp_path):
    path = tmp_path / "secret"
    path.write_text("  a-secret-of-the-cluster  \n")
    assert read_secret_file(str(path)) == "a-secret-of-the-cluster"
    for bad in ("short\n", "two\nlines-of-a-long-secret\n", ""):
        path.write_text(bad)
        with pytest.raises(SecretError):
            read_secret_file(str(path))
    with pytest.raises(SecretError, match="cluster.secret_file"):
        read_secret_file(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://10.0.0.5:5001", True),
        ("https://node-2.internal", True),
        ("http://[::1]:5001", True),
        ("http://10.0.0.5:5001/path", False),
        ("http://user@10.0.0.5", False),
        ("file:///etc/passwd", False),
        ("http://a" + "a" * 400, False),
    ],
)
def test_node_urls_from_the_database_are_checked_before_use(url, ok):
    assert bool(NODE_URL_RE.fullmatch(url)) is ok


# --- the coordinator, with the database and the other nodes played by the test --------


class FakeSession:
    """Each query waits until the test answers it."""

    generation = 1

    def __init__(self) -> None:
        self.queries: list[tuple[Any, Deferred[Any]]] = []

    def run(self, f: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queries.append((f, d))
        return d

    def answer(self, result: Any) -> Any:
        f, d = self.queries.pop(0)
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)
        return f.func


class FakePeers:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []

    async def open(self, node: str, digest: str, size: int, offset: int) -> Any:
        self.asked.append((node, offset))
        return self.answers.get(node)


def coordinator(peers: FakePeers | None = None) -> tuple[ClusterCoordinator, FakeSession, Clock]:
    session, clock = FakeSession(), Clock()
    peers = peers or FakePeers({})
    made = ClusterCoordinator(LocalCoordinator(), session, "http://a:1", peers, clock)  # type: ignore[arg-type]
    return made, session, clock


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_the_claim_holder_fetches_from_the_upstream_and_unlocks_at_release():
    made, session, _ = coordinator()
    d = made.lead(DIGEST, 10)
    assert session.answer((True, [])) is _try_lock
    assert result_of(d) is None
    made.release(DIGEST)
    assert session.answer(None) is _unlock
    made.release(DIGEST)
    assert session.queries == []  # once only


def test_a_fill_elsewhere_is_followed_and_a_holder_is_copied_from():
    made, session, _ = coordinator(FakePeers({"http://b:1": "stream of b"}))
    d = made.lead(DIGEST, 10, 5)
    session.answer((False, ["http://b:1"]))
    assert result_of(d) == "stream of b"
    made.release(DIGEST)
    assert session.queries == []  # not ours to unlock
    d = made.lead(DIGEST, 10)
    session.answer((True, ["http://c:1", "http://b:1"]))  # c holds it but does not answer
    assert result_of(d) == "stream of b"


def test_a_filler_that_does_not_answer_is_asked_again_then_left():
    made, session, clock = coordinator()
    d = made.lead(DIGEST, 10)
    for _ in range(LEAD_ATTEMPTS):
        session.answer((False, ["http://b:1"]))
        clock.advance(LEAD_INTERVAL)
    assert result_of(d) is None  # fetched alone


def test_a_claim_taken_after_its_fill_ended_is_released_at_once():
    made, session, _ = coordinator()
    d = made.lead(DIGEST, 10)
    made.release(DIGEST)  # the fill was abandoned while the lock was being taken
    session.answer((True, []))
    assert result_of(d) is None
    assert session.answer(None) is _unlock


def test_without_postgresql_a_node_fetches_alone_and_backs_off():
    made, session, clock = coordinator()
    d = made.lead(DIGEST, 10)
    session.answer(DatabaseUnavailable("down"))
    assert result_of(d) is None
    assert result_of(made.lead(DIGEST, 10)) is None
    assert session.queries == []  # not asked again so soon
    clock.advance(BACKOFF)
    made.lead(DIGEST, 10)
    assert len(session.queries) == 1


def test_the_sweep_keeps_the_shared_index_bounded(postgres):
    """Expired tags and proofs of digests no node holds or fills go; the rest stays."""
    import psycopg

    from dockmirror.cluster.index import sweep

    held, filling, gone = ("sha256:" + c * 64 for c in "abc")
    schema = resources.files("dockmirror.cluster").joinpath("cache.sql").read_text()
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(schema)
        conn.execute(
            "INSERT INTO cache_blobs (digest, node_url, size) VALUES (%s, 'n', 1)", (held,)
        )
        conn.execute("INSERT INTO fills (digest, node_url, size) VALUES (%s, 'n', 1)", (filling,))
        for digest in (held, filling, gone):
            conn.execute("INSERT INTO cache_access VALUES ('hub/a https://x', %s)", (digest,))
        for tag, resolved in (("old", 100.0), ("fresh", 5000.0)):
            conn.execute(
                "INSERT INTO cache_tags VALUES ('hub/a https://x', %s, 'm', %s, 'body', %s)",
                (tag, held, resolved),
            )
        assert sweep(1000.0, 10, conn) == (1, 1)
        assert {r[0] for r in conn.execute("SELECT digest FROM cache_access")} == {held, filling}
        assert [r[0] for r in conn.execute("SELECT tag FROM cache_tags")] == ["fresh"]
        assert sweep(1000.0, 10, conn) == (0, 0)


def test_the_shared_tags_are_kept_to_the_max_tags_resolved_last(postgres):
    import psycopg

    from dockmirror.cluster.index import trim_tags

    schema = resources.files("dockmirror.cluster").joinpath("cache.sql").read_text()
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(schema)
        for i, media_types in enumerate(["m", "m", "mn", "m", "mn"]):
            for media_type in media_types:
                conn.execute(
                    "INSERT INTO cache_tags VALUES ('hub/a https://x', %s, %s, 'd', 'b', %s)",
                    (f"v{i}", media_type, float(i)),
                )
        conn.execute("UPDATE cache_tags SET resolved = 9 WHERE tag = 'v0' AND media_type = 'm'")
        assert trim_tags(3, conn) == 3  # v1, and v2's two entries
        tags = conn.execute("SELECT DISTINCT tag FROM cache_tags ORDER BY tag").fetchall()
        assert [tag for (tag,) in tags] == ["v0", "v3", "v4"]
        assert trim_tags(3, conn) == 0


class RecordingDatabase:
    """Runs nothing: keeps what it is given to run."""

    def __init__(self) -> None:
        self.ran: list[Any] = []

    async def run(self, f: Any) -> None:
        self.ran.append(f)


def test_a_node_recording_many_tags_keeps_the_shared_ones_to_max_tags():
    from dockmirror.cluster.index import ClusterIndex, trim_tags

    database = RecordingDatabase()
    index = ClusterIndex(PurgedCache(), database, None, "http://a:1", Clock())  # type: ignore[arg-type]
    for i in range(25):  # max_tags is 100: trimmed every 10 tags recorded
        index.publish("hub/a https://x", f"v{i}", "m", "sha256:" + "a" * 64, b"{}", 1.0)
    trims = [f for f in database.ran if f.func is trim_tags]
    assert len(database.ran) == 27 and len(trims) == 2 and trims[0].args == (100,)


@pytest_twisted.ensureDeferred
async def test_a_backoff_ends_with_a_success_and_ignores_older_failures():
    """A query that waited while PostgreSQL came back, then failed, starts no backoff
    once a later-started query succeeded; and a success ends a backoff."""
    clock = Clock()
    backoff = Backoff(clock, seconds=5)
    slow: Deferred[None] = Deferred()

    async def down() -> None:
        raise DatabaseUnavailable("down")

    async def up() -> str:
        return "ok"

    waiting = Deferred.fromCoroutine(backoff.run(lambda: slow))
    clock.advance(1)
    assert await backoff.run(up) == "ok"
    slow.errback(DatabaseUnavailable("gave up waiting"))
    with pytest.raises(DatabaseUnavailable):
        await waiting
    assert await backoff.run(up) == "ok"  # not backing off
    clock.advance(1)
    with pytest.raises(DatabaseUnavailable, match="down"):
        await backoff.run(down)
    with pytest.raises(DatabaseUnavailable, match="a moment ago"):
        await backoff.run(up)
    clock.advance(5)
    assert await backoff.run(up) == "ok"


def test_a_restarted_process_reconciles_its_nodes_rows_with_the_disk(postgres, tmp_path):
    """Rows are added only for blobs still on disk, deleted only for files gone; the
    last access of a row the start found, and other nodes' rows, stay as they were."""
    import os

    import psycopg

    from dockmirror.cluster.index import reconcile_node

    kept, removed, added, evicted, other = ("sha256:" + c * 64 for c in "abcde")

    def path(digest: str) -> str:
        return str(tmp_path / digest)

    for digest in (kept, added, evicted):
        open(path(digest), "w").close()
    schema = resources.files("dockmirror.cluster").joinpath("cache.sql").read_text()
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(schema)
        rows = [(kept, "n", "2020-01-01"), (removed, "n", "2020-01-01"), (other, "m", "2020-01-01")]
        for row in rows:
            conn.execute("INSERT INTO cache_blobs VALUES (%s, %s, 1, %s)", row)
        # What the process found at its start; then another process of the node
        # evicted a blob (its file and its row) and removed another one.
        snapshot = [(kept, 1), (added, 1), (evicted, 1)]
        os.remove(path(evicted))
        counts = reconcile_node("n", snapshot, path, conn)
        found = conn.execute(
            "SELECT digest, node_url, used < '2021-01-01' FROM cache_blobs ORDER BY digest"
        ).fetchall()
        assert found == [(kept, "n", True), (added, "n", False), (other, "m", True)]
        assert counts == (1, 1)


class PositionIndex:
    """The node's own index, as far as the position in the cluster's purges goes."""

    def __init__(self) -> None:
        self.written: list[tuple[int, float]] = []

    def write(self, sql: str, applied: int, polled: float, key: object) -> None:
        self.written.append((applied, polled))


class PurgedCache:
    """What the shared index hooks into in a cache, and the purges it applies."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        hooks = ("on_add", "on_remove", "on_gone", "on_touch", "on_grant", "on_disown")
        self.blobs = SimpleNamespace(**{hook: [] for hook in hooks}, proofs_elsewhere=None)
        self.manifests = SimpleNamespace(ttl=60, max_tags=100, shared=None)
        self.on_purge: list[Any] = []
        self.on_purge_heard: list[Any] = []
        self.purges_applied = (0, 0.0)
        self.index = PositionIndex()
        self.applied: list[str] = []

    def purged_elsewhere(self, what: str) -> None:
        self.applied.append(what)


def test_purges_whose_notification_was_lost_are_applied_once_from_the_records():
    """Made by another process after the last one applied on this node, not heard
    of: applied once; the node's position moves past those settled."""
    from dockmirror.cluster.index import PURGE_HEARD, ClusterIndex

    clock = Clock()
    clock.advance(1000)
    cache = PurgedCache()
    index = ClusterIndex(cache, None, None, "http://a:1", clock)  # type: ignore[arg-type]
    for hook in cache.on_purge_heard:  # a notification came
        hook("hub/heard")
    rows = [
        (2, "hub/lost-first", "other", 1000.5, True),
        (3, "hub/heard", "other", 1002.0, True),
        (4, "hub/mine", index._origin, 1001.0, False),  # made here, just now
        (5, "hub/lost", "other", 1001.0, True),
    ]
    index._apply_purges(rows)
    assert cache.applied == ["hub/lost-first", "hub/lost"]
    assert cache.index.written == [(3, 1000.0)]  # not past the purge just recorded
    index._apply_purges(rows[2:])
    assert cache.applied == ["hub/lost-first", "hub/lost"]
    # A later purge of a repository heard of before is another purge.
    clock.advance(60)
    index._apply_purges([(4, "hub/mine", index._origin, 1001.0, True), rows[3]])
    index._apply_purges([(6, "hub/heard", "other", 1060.0, True)])
    assert cache.applied == ["hub/lost-first", "hub/lost", "hub/heard"]
    assert cache.index.written[-2:] == [(5, 1060.0), (6, 1060.0)]
    clock.advance(PURGE_HEARD)
    index._apply_purges([])
    assert index._purges_heard == {}


def test_a_node_forgets_its_row_of_a_blob_only_once_the_file_is_gone(tmp_path):
    """So that a reconcile between the two never finds the file without its row, and
    adds the row back for a blob the node no longer holds."""
    import os

    from dockmirror.cluster.index import ClusterIndex, _execute

    from ._cache_support import HeldRunner, make_store, sha256

    disk, session = HeldRunner(), FakeSession()
    cache = PurgedCache()
    cache.blobs = make_store(tmp_path, run=disk)  # type: ignore[assignment]
    ClusterIndex(cache, None, session, "http://a:1", Clock())  # type: ignore[arg-type]
    digest = sha256(b"data")
    Deferred.fromCoroutine(cache.blobs.put_small(digest, b"data"))
    disk.run_all()
    session.answer(None)  # its row
    assert cache.blobs.remove(digest)
    assert session.queries == []  # not while the file is there
    disk.run_all()
    assert not os.path.exists(cache.blobs.path(digest))
    f, _ = session.queries[0]
    assert f.func is _execute and f.args[0].startswith("DELETE FROM cache_blobs")


class Outage:
    """A session and a pool to a PostgreSQL that is down."""

    generation = 1

    def __init__(self) -> None:
        self.queries = 0

    def run(self, f: Any) -> Deferred[Any]:
        self.queries += 1
        return fail(DatabaseUnavailable("connection refused"))


class PoolOutage(Outage):
    async def run(self, f: Any) -> Any:  # type: ignore[override]
        return await super().run(f)

    def call(self, f: Any) -> Any:
        raise DatabaseUnavailable("connection refused")


def test_an_outage_is_logged_once_by_the_shared_index_and_once_by_the_coordinator():
    """Not a warning per blob recorded, tag read or published, or fill led."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    from dockmirror.cluster.index import ClusterIndex

    clock, outage, pool = Clock(), Outage(), PoolOutage()
    cache = PurgedCache()
    index = ClusterIndex(cache, pool, outage, "http://a:1", clock)  # type: ignore[arg-type]
    made = ClusterCoordinator(LocalCoordinator(), outage, "http://a:1", FakePeers({}), clock)  # type: ignore[arg-type]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for n in range(10):
            digest = f"sha256:{n:064x}"
            for added in cache.blobs.on_add:
                added(digest, 1)
            for gone in cache.blobs.on_gone:
                gone(digest)
            index.publish("hub/a https://x", "v1", "m", digest, b"{}", 1.0)
            assert result_of(Deferred.fromCoroutine(index.tags("hub/a https://x", "v1", 0))) == []
            assert result_of(made.lead(digest, 10)) is None
            clock.advance(BACKOFF)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warned = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
    assert outage.queries + pool.queries >= 20
    assert [w.partition(":")[0] for w in warned] == ["cluster index", "fill coordinator"]
    assert all("PostgreSQL is unavailable (connection refused)" in w for w in warned)


def test_a_session_dropped_by_postgresql_connects_again_at_once(postgres):
    """As when PostgreSQL restarted: the first query after it is not lost (nor the fill
    it coordinates left to the node alone)."""
    import psycopg

    from dockmirror.cluster.coordinator import Session

    session = Session(postgres, None)

    def pid(conn: Any) -> Any:
        return conn.execute("SELECT pg_backend_pid()").fetchone()[0]

    first = session._call(pid)
    with psycopg.connect(postgres, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (first,))
    assert session._call(pid) != first
    assert session.generation == 2  # its claims went with the first connection
    session.stop()


def test_a_node_away_for_longer_than_purges_are_kept_says_so():
    from types import SimpleNamespace

    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    from dockmirror.cluster.index import PURGE_KEEP, ClusterIndex

    clock, session, pool = Clock(), FakeSession(), PoolOutage()
    cache = PurgedCache()
    cache.blobs = SimpleNamespace(**vars(cache.blobs), entries=list, path=str)
    cache.purges_applied = (5, 1000.0)
    index = ClusterIndex(cache, pool, session, "http://a:1", clock)  # type: ignore[arg-type]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for away in (PURGE_KEEP - 60, PURGE_KEEP + 60):
            clock.advance(1000 + away - clock.seconds())
            index.startService()
            index.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warned = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert [w for w in warned if "days ago" in w] == [
        "this node last read the cluster's purges 30 days ago, and they are kept 30 days:"
        " purges made meanwhile may not be applied here"
    ]
