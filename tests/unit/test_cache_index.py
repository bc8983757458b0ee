"""The cache index: batched writes behind, rows back at start."""

from __future__ import annotations

import sqlite3
from importlib import resources

from twisted.internet.testing import MemoryReactorClock

from dockmirror.cache.index import FLUSH_DELAY, Index

from ._cache_support import HeldRunner, run_now


def test_writes_are_batched_and_coalesced(tmp_path):
    clock = MemoryReactorClock()
    db = HeldRunner()
    index = Index(str(tmp_path / "i.sqlite"), clock, db)
    index.load()
    index.write("INSERT INTO blobs VALUES (?, ?, ?)", "sha256:a", 1, 0.0)
    for used in (1.0, 2.0, 3.0):
        index.write("UPDATE blobs SET used = ? WHERE digest = ?", used, "sha256:a", key="a")
    clock.advance(FLUSH_DELAY)
    [(_, (_, batch), _)] = db.queue
    assert len(batch) == 2 and batch[1][1] == (3.0, "sha256:a")
    index.write("INSERT INTO access VALUES (?, ?)", "origin", "sha256:a")
    closed = index.close()  # waits for the batch in flight, then writes the rest
    db.run_all()
    db.run_all()
    assert closed.called

    again = Index(str(tmp_path / "i.sqlite"), clock, run_now)
    snapshot = again.load()
    assert snapshot.blobs == [("sha256:a", 1, 3.0)]
    assert snapshot.access == [("origin", "sha256:a")]
    again.close()


def test_version_1_access_records_are_dropped_on_upgrade(tmp_path):
    # Version 1 recorded what manifests named as if proven: none of it is kept.
    path = tmp_path / "i.sqlite"
    db = sqlite3.connect(path)
    schema = (resources.files("dockmirror.cache") / "schema.sql").read_text()
    db.executescript(
        schema.partition("\n-- The objects of the shared storage tier")[0]
        .replace("INSERT INTO version VALUES (5)", "INSERT INTO version VALUES (1)")
        .replace("CREATE INDEX blobs_used ON blobs (used);", "")
    )
    db.execute("INSERT INTO blobs VALUES ('sha256:a', 1, 0.0)")
    db.execute("INSERT INTO access VALUES ('hub/x https://hub', 'sha256:a')")
    db.commit()
    db.close()
    index = Index(str(path), MemoryReactorClock(), run_now)
    snapshot = index.load()
    assert snapshot.blobs == [("sha256:a", 1, 0.0)]
    assert snapshot.access == []
    assert snapshot.objects == []
    index.close()
    assert sqlite3.connect(path).execute("SELECT version FROM version").fetchall() == [(5,)]
