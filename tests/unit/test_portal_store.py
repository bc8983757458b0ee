"""The portal's storage: key owners and quotas, the schema upgrade, usage per day, sessions."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from dockmirror.auth.keydb import KeyDatabase
from dockmirror.auth.keys import DAY, HOUR, QuotaExceeded, Usage
from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.queries import USAGE_DAYS, KeyQueries
from dockmirror.portal.sessions import (
    LOGIN_TTL,
    MAX_SESSIONS_PER_USER,
    PendingLogin,
    PortalDatabase,
    PortalQueries,
    PortalStoreError,
    SessionStore,
)
from dockmirror.portal.users import UsersConsole, disable

from .test_keystore import FakeTime


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def db(tmp_path: Path, clock: FakeTime) -> KeyDatabase:
    return KeyDatabase(tmp_path / "keys.sqlite", clock=clock)


@pytest.fixture(params=["sqlite", "postgresql"])
def portal_db(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeTime
) -> Iterator[PortalQueries]:
    """The portal's store on each database it runs on, which must behave the same."""
    if request.param == "sqlite":
        db = PortalDatabase(tmp_path / "portal.sqlite", clock=clock)
        yield db
        db.close()
        return
    import psycopg

    from dockmirror.cluster.portal import PostgresPortalDatabase, schema

    with psycopg.connect(request.getfixturevalue("postgres"), autocommit=True) as conn:
        conn.execute(schema())
        yield PostgresPortalDatabase(conn, clock)


def _downgrade_to_version_1(path: Path) -> None:
    """Make *path* look as schema 1 left it: no owners, no usage tables."""
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "DROP INDEX keys_owner; ALTER TABLE keys DROP COLUMN owner;"
            " DROP TABLE key_usage_daily; DROP TABLE traffic_hourly;"
            " UPDATE version SET version = 1;"
        )


def test_upgrade_from_version_1_keeps_every_key_working(db: KeyDatabase, tmp_path: Path) -> None:
    new = db.create("laptop", ["hub/library"])
    revoked = db.create("old")
    db.revoke(revoked.app_id)
    db.close()
    _downgrade_to_version_1(tmp_path / "keys.sqlite")
    upgraded = KeyDatabase(tmp_path / "keys.sqlite")
    key = upgraded.verify(new.app_id, new.api_key)
    assert key is not None and key.owner == "operator" and key.repositories == ("hub/library",)
    assert upgraded.verify(revoked.app_id, revoked.api_key) is None
    assert [k.owner for k in upgraded.list()] == ["operator", "operator"]
    (version,) = upgraded._conn.execute("SELECT version FROM version").fetchone()
    assert version == 2
    upgraded.add_usage({new.app_id: Usage(1, 10, 1_700_000_000)})
    upgraded.close()
    assert KeyDatabase(tmp_path / "keys.sqlite").get(new.app_id).use_count == 1  # reopens


def test_owners_and_quota(keys: KeyQueries) -> None:
    keys.create("by the operator")
    a = keys.create("a", owner="github:alice", max_live=2)
    keys.create("b", owner="github:alice", max_live=2)
    with pytest.raises(QuotaExceeded):
        keys.create("c", owner="github:alice", max_live=2)
    keys.create("bob's", owner="github:bob", max_live=2)
    rotated = keys.rotate(a.app_id)  # keeps the owner, and the count
    assert keys.get(rotated.app_id).owner == "github:alice"
    with pytest.raises(QuotaExceeded):
        keys.create("c", owner="github:alice", max_live=2)
    keys.revoke(rotated.app_id)
    keys.create("c", owner="github:alice", max_live=2)
    assert {k.name for k in keys.list("github:alice") if not k.revoked} == {"b", "c"}
    assert [k.name for k in keys.list("github:bob")] == ["bob's"]
    assert repr(keys.list("github:bob")[0]).startswith(
        f'<key {keys.list("github:bob")[0].app_id} "bob\'s" of github:bob active'
    )


def test_revoke_owner(keys: KeyQueries) -> None:
    mine = [keys.create(n, owner="github:alice").app_id for n in ("a", "b")]
    other = keys.create("x", owner="github:bob")
    assert sorted(keys.revoke_owner("github:alice")) == sorted(mine)
    assert all(keys.get(app_id).revoked for app_id in mine)
    assert not keys.get(other.app_id).revoked
    assert keys.revoke_owner("github:alice") == ()


def test_usage_per_day_is_kept_for_a_bounded_time(keys: KeyQueries, clock: FakeTime) -> None:
    a = keys.create("a", owner="github:alice")
    b = keys.create("b", owner="github:bob")
    today = int(clock.now) // DAY
    keys.add_usage(
        {a.app_id: Usage(2, 100, int(clock.now) - DAY), b.app_id: Usage(1, 7, int(clock.now))}
    )
    keys.add_usage({a.app_id: Usage(1, 50, int(clock.now))})
    keys.add_usage({a.app_id: Usage(1, 5, int(clock.now))})
    assert keys.daily_usage("github:alice", 30) == (
        (a.app_id, today - 1, 2, 100),
        (a.app_id, today, 2, 55),
    )
    assert keys.daily_usage("github:alice", 1) == ((a.app_id, today, 2, 55),)
    assert len(keys.daily_usage(None, 30)) == 3
    clock.now += USAGE_DAYS * DAY
    keys.add_usage({b.app_id: Usage(1, 1, int(clock.now))})
    rows = keys._rows("SELECT count(*) FROM key_usage_daily")[0][0]
    assert rows == 1  # the old days are gone


def test_hourly_traffic_is_bounded(keys: KeyQueries, clock: FakeTime) -> None:
    hour = int(clock.now) // HOUR
    for h in range(hour - 100, hour + 1):
        keys.add_traffic(h, 3)
    keys.add_traffic(hour, 4)
    assert keys.traffic(2) == {hour - 1: 3, hour: 7}
    assert keys._rows("SELECT count(*) FROM traffic_hourly")[0][0] <= 48


def test_sessions(portal_db: PortalQueries, clock: FakeTime) -> None:
    session = portal_db.create_session("s1", "github:alice", "Alice", ttl=100)
    assert portal_db.get_session("s1") == session
    assert portal_db.get_session("s2") is None
    ((raw,),) = portal_db._rows(f"SELECT id_hash FROM {portal_db._sessions}")
    assert b"s1" not in bytes(raw)  # only a digest is stored
    clock.now += 100
    assert portal_db.get_session("s1") is None  # expired
    portal_db.create_session("s3", "github:alice", "Alice", ttl=100)
    portal_db.end_session("s3")
    assert portal_db.get_session("s3") is None


def test_sessions_per_user_are_bounded(portal_db: PortalQueries, clock: FakeTime) -> None:
    for i in range(MAX_SESSIONS_PER_USER + 5):
        clock.now += 1
        portal_db.create_session(f"s{i}", "github:alice", "Alice", ttl=1000)
    assert portal_db.get_session("s0") is None
    assert portal_db.get_session(f"s{MAX_SESSIONS_PER_USER + 4}") is not None
    ((count,),) = portal_db._rows(f"SELECT count(*) FROM {portal_db._sessions}")
    assert count == MAX_SESSIONS_PER_USER


def test_a_sign_in_state_is_used_once_and_expires(
    portal_db: PortalQueries, clock: FakeTime
) -> None:
    login = PendingLogin("github", "verifier", "nonce")
    portal_db.begin_login("state-1", login)
    assert portal_db.finish_login("state-1") == login
    assert portal_db.finish_login("state-1") is None
    portal_db.begin_login("state-2", login)
    clock.now += LOGIN_TTL
    assert portal_db.finish_login("state-2") is None


def test_disable_revokes_keys_and_ends_sessions(portal_db: PortalQueries, keys: KeyQueries) -> None:
    key = keys.create("laptop", owner="github:alice")
    portal_db.create_session("s1", "github:alice", "Alice", ttl=100)
    portal_db.create_session("s2", "github:bob", "Bob", ttl=100)
    result = disable(portal_db, keys, "github:alice")
    assert result == {"identity": "github:alice", "sessionsEnded": 1, "keysRevoked": (key.app_id,)}
    assert portal_db.get_session("s1") is None and portal_db.get_session("s2") is not None
    assert keys.verify(key.app_id, key.api_key) is None
    assert portal_db.is_disabled("github:alice")
    portal_db.create_session("s3", "github:alice", "Alice", ttl=100)
    assert portal_db.get_session("s3") is None  # even a session made behind the check's back
    portal_db.set_disabled("github:alice", False)
    assert not portal_db.is_disabled("github:alice")
    with pytest.raises(ValueError, match="not an identity"):
        disable(portal_db, keys, "alice")


@pytest_twisted.ensureDeferred
async def test_manhole_users_console(key_store: KeyStore, tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "portal-db" / "portal.sqlite", reactor)
    store.startService()
    try:
        users = UsersConsole(store, key_store)
        new = await key_store.create("laptop", owner="github:alice")
        await store.run(PortalQueries.create_session, "s1", "github:alice", "Alice", 100)
        result = await users.disable("github:alice")
        assert result == {
            "identity": "github:alice",
            "sessionsEnded": 1,
            "keysRevoked": (new.app_id,),
        }
        assert new.app_id in key_store.revoked  # bearer tokens refused at once
        (user,) = await users.list()
        assert repr(user).startswith("<user github:alice 'Alice' disabled")
        await users.enable("github:alice")
        assert not await store.run(PortalQueries.is_disabled, "github:alice")
        assert "disable(identity)" in repr(users)
    finally:
        await store.stopService()


def test_a_store_is_copied_again_without_changing_what_the_target_holds(
    portal_db: PortalQueries, tmp_path: Path, clock: FakeTime
) -> None:
    source = PortalDatabase(tmp_path / "source.sqlite", clock=clock)
    source.create_session("s1", "github:alice", "Alice", ttl=100)
    source.create_session("gone", "github:carol", "Carol", ttl=10)
    source.set_disabled("github:bob", True)
    clock.now += 50
    dump = source.export()
    assert len(dump[1]) == 1  # only live sessions
    assert portal_db.load(dump) == (3, 0, 1)
    assert portal_db.get_session("s1") == source.get_session("s1")
    assert portal_db.is_disabled("github:bob")
    assert portal_db.users() == source.users()
    # The target disables alice; the source signs dave in and enables bob.
    portal_db.set_disabled("github:alice", True)
    source.create_session("s2", "github:dave", "Dave", ttl=100)
    source.set_disabled("github:bob", False)
    assert portal_db.load(source.export()) == (1, 3, 1)
    assert portal_db.is_disabled("github:alice") and portal_db.is_disabled("github:bob")
    assert portal_db.get_session("s1") is None
    assert portal_db.get_session("s2") == source.get_session("s2")
    assert portal_db.load(source.export()) == (0, 4, 0)


def test_keys_are_copied_again_without_changing_what_the_target_holds(
    keys: KeyQueries, db: KeyDatabase, clock: FakeTime
) -> None:
    """A key held already keeps its state and usage; what is missing is copied."""
    revoked, used = db.create("ci"), db.create("laptop")
    rotated = db.rotate(revoked.app_id)
    db.add_usage({used.app_id: Usage(3, 300, clock.now)})
    db.add_traffic(clock.now // HOUR, 3)
    assert keys.load(db.export()) == (3, 0)
    assert keys.list() == db.list()
    keys.revoke(rotated.app_id)
    late = db.create("late")
    db.add_usage({used.app_id: Usage(1, 100, clock.now), late.app_id: Usage(2, 10, clock.now)})
    db.add_traffic(clock.now // HOUR, 3)
    assert keys.load(db.export()) == (1, 3)
    assert keys.get(rotated.app_id).revoked
    assert keys.get(used.app_id).use_count == 3
    assert keys.get(late.app_id) == db.get(late.app_id)
    assert keys.verify(late.app_id, late.api_key) is not None
    assert keys.traffic(1) == {clock.now // HOUR: 3}
    assert {(u[0], u[2]) for u in keys.daily_usage(None, 1)} == {(used.app_id, 3), (late.app_id, 2)}
    assert keys.load(db.export()) == (0, 4)


@pytest_twisted.ensureDeferred
async def test_postgresql_down_is_a_store_error_at_once_then_again_after_a_while() -> None:
    pytest.importorskip("psycopg")
    from dockmirror.cluster.database import Database
    from dockmirror.cluster.portal import PostgresSessions

    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    database = Database(
        f"postgresql://nobody@127.0.0.1:{port.getsockname()[1]}/none", reactor, max_connections=1
    )
    database.start()
    try:
        store = PostgresSessions(database, reactor)
        with pytest.raises(PortalStoreError, match="unavailable"):
            await store.run(PortalQueries.users)
        started = time.monotonic()
        with pytest.raises(PortalStoreError, match="failed a moment ago"):
            await store.run(PortalQueries.users)
        assert time.monotonic() - started < 0.5  # no wait for a connection
    finally:
        database.stop()
        port.close()
