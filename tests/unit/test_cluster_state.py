"""The cluster's notifications and configuration, without a database."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from dockmirror.auth.keystore import REVOKED_TOPIC, KeyStore
from dockmirror.cluster.notify import (
    CHANNEL,
    MAX_PAYLOAD,
    MAX_STRINGS,
    PostgresNotifier,
    decode,
    encode,
)
from dockmirror.config import ConfigError, load


def test_payloads_round_trip_and_are_bounded() -> None:
    payload = encode("purge", ["hub/library/alpine"], "abc")
    assert payload is not None and decode(payload) == ("abc", "purge", ["hub/library/alpine"])
    assert encode("purge", ["x" * MAX_PAYLOAD]) is None
    assert encode("purge", ["x"] * (MAX_STRINGS + 1)) is None


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
    assert decode(payload) is None


def test_a_notifier_passes_on_what_others_sent_to_subscribers_only(tmp_path: Path) -> None:
    notifier = PostgresNotifier(None, Clock())  # type: ignore[arg-type] - never sends here
    heard: list[list[str]] = []
    notifier.subscribe("purge", heard.append)
    notifier.received(encode("purge", ["a"], "another-process") or "")
    notifier.received(encode("purge", ["mine"], notifier.origin) or "")  # its own: ignored
    notifier.received(encode("unknown", ["b"], "another-process") or "")
    notifier.received('["x", "purge", [1, 2]]')
    assert heard == [["a"]]


def test_revocations_heard_are_checked(tmp_path: Path) -> None:
    notifier = PostgresNotifier(None, Clock())  # type: ignore[arg-type]
    keys = KeyStore(tmp_path / "keys.sqlite", Clock())
    keys.share(notifier)
    good = "app_" + "a1" * 10
    notifier.received(encode(REVOKED_TOPIC, [good, "app_../x", "x" * 300], "other") or "")
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


def test_revocations_are_announced_when_they_commit(postgres: str) -> None:
    import psycopg

    from dockmirror.cluster.keys import PostgresKeyDatabase, schema

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
        heard = [decode(n.payload) for n in listener.notifies(timeout=2, stop_after=2)]
        assert heard[0] == ("", REVOKED_TOPIC, [other.app_id])
        assert heard[1] is not None and sorted(heard[1][2]) == sorted(mine)
