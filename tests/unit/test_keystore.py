import json
import os
import re
import sqlite3
import stat
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from dockmirror.auth.keydb import KeyDatabase
from dockmirror.auth.keys import KeyStoreError, Usage
from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.queries import KeyQueries


class FakeTime:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def db(tmp_path: Path, clock: FakeTime) -> KeyDatabase:
    return KeyDatabase(tmp_path / "state" / "keys.sqlite", clock=clock)


def test_new_key_shape(keys: KeyQueries) -> None:
    new = keys.create("laptop")
    assert re.fullmatch(r"app_[a-z0-9]{20}", new.app_id)
    assert re.fullmatch(r"sk_[A-Za-z0-9_-]{43,}", new.api_key)  # 32 random bytes, URL-safe
    assert new.to_json() == {"appId": new.app_id, "apiKey": new.api_key}
    assert keys.create("laptop").api_key != new.api_key


def test_verify(keys: KeyQueries) -> None:
    new = keys.create("ci")
    info = keys.verify(new.app_id, new.api_key)
    assert info is not None and info.app_id == new.app_id and info.name == "ci"
    assert keys.verify(new.app_id, new.api_key + "x") is None
    assert keys.verify(new.app_id, "") is None
    assert keys.verify("app_unknown", new.api_key) is None
    other = keys.create("other")
    assert keys.verify(other.app_id, new.api_key) is None
    assert keys.verify(new.app_id, "x" * 100_000) is None


def test_only_a_salted_hash_is_stored(db: KeyDatabase, tmp_path: Path) -> None:
    keys = [db.create(f"key{i}") for i in range(3)]
    db.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir())
    for key in keys:
        secret = key.api_key.encode()
        assert secret not in raw
        assert secret[3:] not in raw
        assert key.app_id.encode() in raw
    with sqlite3.connect(tmp_path / "state" / "keys.sqlite") as conn:
        salts = [row[0] for row in conn.execute("SELECT salt FROM keys")]
    assert len(set(salts)) == 3


def test_files_are_private(db: KeyDatabase, tmp_path: Path) -> None:
    db.create("x")
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    for path in (tmp_path / "state").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_list_never_shows_secrets(keys: KeyQueries, clock: FakeTime) -> None:
    a = keys.create("laptop")
    clock.now += 10
    b = keys.create("ci", ["dockerhub/library"])
    listed = [k.to_json() for k in keys.list()]
    assert [k["appId"] for k in listed] == [a.app_id, b.app_id]
    assert listed[0] == {
        "appId": a.app_id,
        "name": "laptop",
        "owner": "operator",
        "createdAt": "2023-11-14T22:13:20Z",
        "lastUsedAt": None,
        "useCount": 0,
        "bytesServed": 0,
        "revoked": False,
        "revokedAt": None,
        "replacedBy": None,
        "repositories": None,
    }
    assert listed[1]["repositories"] == ["dockerhub/library"]
    text = json.dumps(listed) + repr(keys.list())
    assert a.api_key not in text and b.api_key not in text


def test_revoke(keys: KeyQueries, clock: FakeTime) -> None:
    new = keys.create("laptop")
    clock.now += 60
    info = keys.revoke(new.app_id)
    assert info.revoked and info.revoked_at == int(clock.now)
    assert keys.verify(new.app_id, new.api_key) is None
    assert keys.revoked_ids() == {new.app_id}
    clock.now += 60
    assert keys.revoke(new.app_id).revoked_at == info.revoked_at  # idempotent
    with pytest.raises(KeyStoreError, match="no key app_nope"):
        keys.revoke("app_nope")


def test_rotate(keys: KeyQueries) -> None:
    old = keys.create("ci", ["ghcr/myorg"])
    new = keys.rotate(old.app_id)
    assert new.app_id != old.app_id and new.name == "ci"
    assert keys.verify(old.app_id, old.api_key) is None
    info = keys.verify(new.app_id, new.api_key)
    assert info is not None and info.repositories == ("ghcr/myorg",)
    assert keys.get(old.app_id).replaced_by == new.app_id
    with pytest.raises(KeyStoreError, match="is revoked"):
        keys.rotate(old.app_id)


def test_names_are_checked(keys: KeyQueries) -> None:
    for bad in ("", "   ", "x" * 101, "a\nb"):
        with pytest.raises(ValueError):
            keys.create(bad)


def test_usage_batches(keys: KeyQueries) -> None:
    a, b = keys.create("a"), keys.create("b")
    keys.add_usage({a.app_id: Usage(3, 1000, 1_700_000_100), b.app_id: Usage(1, 5, 1_700_000_050)})
    keys.add_usage({a.app_id: Usage(1, 24, 1_700_000_090)})
    info = keys.get(a.app_id)
    assert (info.use_count, info.bytes_served, info.last_used_at) == (4, 1024, 1_700_000_100)
    assert keys.stats() == {
        "keys": 2,
        "active": 2,
        "revoked": 0,
        "requests": 5,
        "bytesServed": 1029,
        "lastUsedAt": "2023-11-14T22:15:00Z",
    }


def test_second_connection_sees_and_writes(db: KeyDatabase, tmp_path: Path) -> None:
    """dockmirror-admin works on the database the server holds open."""
    server_key = db.create("server")
    admin = KeyDatabase(tmp_path / "state" / "keys.sqlite", create=False)
    admin_key = admin.create("admin")
    admin.revoke(server_key.app_id)
    assert db.verify(admin_key.app_id, admin_key.api_key) is not None
    assert server_key.app_id in db.revoked_ids()
    db.add_usage({admin_key.app_id: Usage(1, 1, 1)})
    assert admin.get(admin_key.app_id).use_count == 1
    mode = admin._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    admin.close()


def test_missing_database_not_created_on_request(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="no key database"):
        KeyDatabase(tmp_path / "keys.sqlite", create=False)
    assert not (tmp_path / "keys.sqlite").exists()


def test_foreign_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(KeyStoreError, match="keys.sqlite"):
        KeyDatabase(path)


def test_newer_schema_refused(db: KeyDatabase, tmp_path: Path) -> None:
    db._conn.execute("UPDATE version SET version = 99")
    db.close()
    with pytest.raises(KeyStoreError, match="schema version 99; this dockmirror knows version 2"):
        KeyDatabase(tmp_path / "state" / "keys.sqlite")


def test_reopening_keeps_keys(db: KeyDatabase, tmp_path: Path) -> None:
    new = db.create("a")
    db.close()
    again = KeyDatabase(tmp_path / "state" / "keys.sqlite")
    assert again.verify(new.app_id, new.api_key) is not None
    again.close()


@pytest_twisted.ensureDeferred
async def test_store_batches_usage_until_flush(key_store: KeyStore) -> None:
    new = await key_store.create("laptop")
    assert await key_store.verify(new.app_id, new.api_key) is not None
    for _ in range(100):
        key_store.record(new.app_id, 10)
    [info] = await key_store.list()
    assert info.use_count == 0
    assert (await key_store.stats())["pendingUsage"] == 100
    await key_store.flush()
    [info] = await key_store.list()
    assert (info.use_count, info.bytes_served) == (100, 1000)
    assert info.last_used_at is not None


@pytest_twisted.ensureDeferred
async def test_store_flushes_when_stopped(tmp_path: Path) -> None:
    from twisted.internet import reactor

    path = tmp_path / "keys.sqlite"
    store = KeyStore(path, reactor)
    store.startService()
    new = await store.create("a")
    store.record(new.app_id, 42)
    await store.stopService()
    check = KeyDatabase(path)
    assert check.get(new.app_id).bytes_served == 42
    check.close()


@pytest_twisted.ensureDeferred
async def test_store_learns_revocations_by_others(key_store: KeyStore, tmp_path: Path) -> None:
    new = await key_store.create("a")
    admin = KeyDatabase(tmp_path / "keys.sqlite")
    admin.revoke(new.app_id)
    admin.close()
    assert new.app_id not in key_store.revoked
    await key_store.flush()
    assert new.app_id in key_store.revoked


@pytest_twisted.ensureDeferred
async def test_store_revoke_and_rotate_take_effect_at_once(key_store: KeyStore) -> None:
    a = await key_store.create("a")
    b = await key_store.create("b")
    await key_store.revoke(a.app_id)
    c = await key_store.rotate(b.app_id)
    assert key_store.revoked == {a.app_id, b.app_id}
    assert await key_store.verify(c.app_id, c.api_key) is not None


@pytest_twisted.ensureDeferred
async def test_store_errors_are_key_store_errors(key_store: KeyStore) -> None:
    with pytest.raises(KeyStoreError, match="no key app_x"):
        await key_store.revoke("app_x")


def test_reprs_are_readable(keys: KeyQueries) -> None:
    new = keys.create("laptop")
    assert repr(new) == f"<new key 'laptop': appId {new.app_id} apiKey {new.api_key}>"
    keys.add_usage({new.app_id: Usage(2, 3 * 1024 * 1024, 1_700_000_000)})
    assert repr(keys.get(new.app_id)) == (
        f"<key {new.app_id} 'laptop' active: 2 requests, 3.0 MiB, last used 2023-11-14T22:13:20Z>"
    )
    assert repr(keys.list()).startswith("1 keys\n<key app_")


@pytest_twisted.ensureDeferred
async def test_flush_loop_survives_any_error(tmp_path: Path) -> None:
    from twisted.internet import reactor

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    store = KeyStore(tmp_path / "keys.sqlite", reactor, flush_interval=0.05)
    store.startService()
    working = store.backend._db.revoked_ids
    try:
        new = await store.create("a")
        store.record(new.app_id, 42)

        def broken() -> frozenset[str]:
            raise RuntimeError("unexpected")

        store.backend._db.revoked_ids = broken  # type: ignore[method-assign]
        await deferLater(reactor, 0.2)
        assert store._loop.running
        store.backend._db.revoked_ids = working  # type: ignore[method-assign]
        admin = KeyDatabase(tmp_path / "keys.sqlite")
        admin.revoke(new.app_id)
        admin.close()
        await deferLater(reactor, 0.2)
        assert new.app_id in store.revoked  # the loop goes on
        assert (await store.list())[0].bytes_served == 42  # written once, not lost or doubled
    finally:
        store.backend._db.revoked_ids = working  # type: ignore[method-assign]
        await store.stopService()
        globalLogPublisher.removeObserver(events.append)
    assert any("log_failure" in e and "key usage" in str(e["log_format"]) for e in events)


@pytest_twisted.ensureDeferred
async def test_flushes_asked_for_together_run_one_after_the_other(key_store: KeyStore) -> None:
    """A resync's flush during the loop's: both complete without error, and no
    usage is lost or doubled."""
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        new = await key_store.create("a")
        key_store.record(new.app_id, 1)
        first = key_store.flush()
        key_store.record(new.app_id, 2)
        second = key_store.flush()
        await first
        await second
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "log_failure" in e]
    [info] = await key_store.list()
    assert (info.use_count, info.bytes_served) == (2, 3)
