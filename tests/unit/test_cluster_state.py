"""The cluster's notifications and configuration, without a database."""

from __future__ import annotations

import hmac
import json
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.queries import REVOKED_TOPIC
from dockmirror.cluster.notify import (
    CHANNEL,
    MAX_AGE,
    MAX_PAYLOAD,
    MAX_STRINGS,
    PostgresNotifier,
    decode,
    encode,
    notification_key,
)
from dockmirror.config import ConfigError, load

KEY = notification_key(b"-----BEGIN PRIVATE KEY-----...")


def test_payloads_round_trip_and_are_bounded() -> None:
    payload = encode("purge", ["hub/library/alpine"], KEY, "abc", 1000.0)
    assert payload is not None
    assert decode(payload, KEY, 1000.0) == ("abc", "purge", ["hub/library/alpine"])
    assert encode("purge", ["x" * MAX_PAYLOAD], KEY) is None
    assert encode("purge", ["x"] * (MAX_STRINGS + 1), KEY) is None


def test_only_payloads_signed_with_the_key_and_recent_are_believed() -> None:
    payload = encode("revoked", ["app_" + "a1" * 10], KEY, "abc", 1000.0)
    assert payload is not None
    other = notification_key(b"another cluster's signing key")
    assert decode(payload, other, 1000.0) is None
    unsigned = payload[64:]
    assert decode(unsigned, KEY, 1000.0) is None
    assert decode("0" * 64 + unsigned, KEY, 1000.0) is None
    tampered = payload.replace("app_a1", "app_b1")
    assert decode(tampered, KEY, 1000.0) is None
    assert decode(payload, KEY, 1000.0 + MAX_AGE + 1) is None  # replayed later
    assert decode(payload, KEY, 1000.0 - MAX_AGE - 1) is None
    assert decode(payload, KEY, 1000.0 + MAX_AGE - 1) is not None


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "{}",
        '["a", "b"]',
        '["a", "topic", "not a list"]',
        '["a", "topic", [1]]',
        '[1, "topic", []]',
        json.dumps(["a", "t" * 41, []]),
        json.dumps(["a", "topic", ["x"] * (MAX_STRINGS + 1)]),
        json.dumps(["a", "topic", ["x" * MAX_PAYLOAD]]),
    ],
)
def test_malformed_payloads_are_refused(payload: str) -> None:
    assert decode(payload, KEY, 0.0) is None
    signed = payload if not payload.startswith("[") else payload[:-1] + ", 0]"
    assert decode(hmac.new(KEY, signed.encode(), "sha256").hexdigest() + signed, KEY, 0.0) is None


def test_a_notifier_passes_on_what_others_sent_to_subscribers_only(tmp_path: Path) -> None:
    notifier = PostgresNotifier(None, Clock(), KEY)  # type: ignore[arg-type] - never sends here
    heard: list[list[str]] = []
    notifier.subscribe("purge", heard.append)
    notifier.received(encode("purge", ["a"], KEY, "another-process", 0.0) or "")
    notifier.received(encode("purge", ["mine"], KEY, notifier.origin, 0.0) or "")  # its own
    notifier.received(encode("unknown", ["b"], KEY, "another-process", 0.0) or "")
    notifier.received('["x", "purge", [1, 2]]')
    notifier.received('["x", "purge", ["forged"], 0]')
    assert heard == [["a"]]
    assert notifier.ignored == 2


def test_revocations_heard_are_checked(tmp_path: Path) -> None:
    notifier = PostgresNotifier(None, Clock(), KEY)  # type: ignore[arg-type]
    keys = KeyStore(tmp_path / "keys.sqlite", Clock())
    keys.share(notifier)
    good = "app_" + "a1" * 10
    message = [good, "app_../x", "x" * 300]
    notifier.received(encode(REVOKED_TOPIC, message, KEY, "other", 0.0) or "")
    assert keys.revoked == {good}


def test_a_database_needs_the_cluster_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dockmirror.toml"
    path.write_text('[cluster]\ndatabase = "postgresql://dockmirror@db.internal/dockmirror"\n')
    assert load(str(path)).cluster.database is not None
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'dockmirror\[cluster\]'"):
        load(str(path))


def test_a_database_is_a_postgresql_url(tmp_path: Path) -> None:
    path = tmp_path / "dockmirror.toml"
    path.write_text('[cluster]\ndatabase = "mysql://db.internal/dockmirror"\n')
    with pytest.raises(ConfigError, match="postgresql://"):
        load(str(path))


def test_a_node_of_several_workers_listens_for_the_cluster(tmp_path: Path) -> None:
    path = tmp_path / "dockmirror.toml"
    path.write_text(
        '[server]\nworkers = 2\n[cluster]\ndatabase = "postgresql://db.internal/dockmirror"\n'
        'listen = "tcp:5001"\nnode_url = "http://10.0.0.5:5001"\n'
    )
    config = load(str(path))
    assert config.server.worker_count == 2 and config.cluster.listen == "tcp:5001"


@pytest.mark.parametrize("size", ["0", "65", '"8"', "true", "2.5"])
def test_the_pool_size_is_a_number_of_connections(tmp_path: Path, size: str) -> None:
    path = tmp_path / "dockmirror.toml"
    table = '[cluster]\ndatabase = "postgresql://db.internal/dockmirror"\npool_size = '
    path.write_text(table + "4\n")
    assert load(str(path)).cluster.pool_size == 4
    path.write_text(table + size + "\n")
    with pytest.raises(ConfigError, match="cluster.pool_size must be an integer|from 1 to 64"):
        load(str(path))


@pytest.mark.parametrize("seconds", ["0", "-1", "301", '"5"', "true"])
def test_the_backoff_is_a_number_of_seconds(tmp_path: Path, seconds: str) -> None:
    path = tmp_path / "dockmirror.toml"
    table = '[cluster]\ndatabase = "postgresql://db.internal/dockmirror"\nbackoff = '
    path.write_text(table.partition("backoff")[0])
    assert load(str(path)).cluster.backoff == 5.0
    path.write_text(table + "0.5\n")
    assert load(str(path)).cluster.backoff == 0.5
    path.write_text(table + seconds + "\n")
    with pytest.raises(ConfigError, match="cluster.backoff must be a number|more than 0"):
        load(str(path))


def test_a_node_says_whether_postgresql_allows_its_connections(postgres: str) -> None:
    """The test's server allows 300 connections, 3 of them for superusers only."""
    import psycopg

    from dockmirror.cluster.database import (
        Database,
        DatabaseService,
        connections_allowed,
        connections_needed,
    )

    with psycopg.connect(postgres, autocommit=True) as conn:
        assert connections_allowed(conn) == 297
    assert connections_needed(workers=4, pool_size=8) == 40
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for needed in (40, 300):
            DatabaseService(Database(postgres, None), needed)._allowed(297)
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [(e["log_level"], formatEvent(e)) for e in events]
    assert said == [
        (
            LogLevel.info,
            "this node may open 40 connections to PostgreSQL, which allows 297:"
            " room for 7 such nodes",
        ),
        (
            LogLevel.warn,
            "this node may open 300 connections to PostgreSQL, which allows 297:"
            " raise its max_connections or lower [cluster] pool_size",
        ),
    ]


def test_revocations_are_announced_when_they_commit(postgres: str) -> None:
    import psycopg

    from dockmirror.cluster.keys import SIGNING_KEY, PostgresKeyDatabase, schema

    with (
        psycopg.connect(postgres, autocommit=True) as conn,
        psycopg.connect(postgres, autocommit=True) as listener,
    ):
        conn.execute(schema())
        listener.execute(f"LISTEN {CHANNEL}")
        keys = PostgresKeyDatabase(conn)
        mine = [keys.create(name, owner="github:alice").app_id for name in ("a", "b")]
        other = keys.create("c")
        keys.revoke(other.app_id)
        keys.revoke_owner("github:alice")
        key = notification_key(keys.shared_secret(SIGNING_KEY, lambda: b"unused"))
        now = time.time()
        notes = listener.notifies(timeout=2, stop_after=2)
        heard = [decode(n.payload, key, now) for n in notes]
        assert heard[0] == ("", REVOKED_TOPIC, [other.app_id])
        assert heard[1] is not None and sorted(heard[1][2]) == sorted(mine)
