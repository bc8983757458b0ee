"""Shared unit-test fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock

from dockmirror.auth.keydb import KeyDatabase
from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.queries import KeyQueries
from tests.integration.postgres import postgres, postgres_server  # noqa: F401 - fixtures


@pytest.fixture(autouse=True)
def clean_reactor() -> Iterator[None]:
    """Fail a test that leaves timers or listening sockets in the global reactor."""
    calls = set(reactor.getDelayedCalls())
    ports = {r for r in reactor.getReaders() if IListeningPort.providedBy(r)}
    yield
    left = [c for c in reactor.getDelayedCalls() if c not in calls and c.active()]
    listening = [r for r in reactor.getReaders() if IListeningPort.providedBy(r) and r not in ports]
    assert not left, f"the test left delayed calls behind: {left}"
    assert not listening, f"the test left ports listening: {listening}"


@pytest.fixture
def clock() -> Clock:
    """A fake clock at 2023-11-14T22:13:20Z."""
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


@pytest_twisted.async_yield_fixture
async def key_store(tmp_path: Path) -> AsyncIterator[KeyStore]:
    """A running KeyStore on a fresh database, stopped (and flushed) after the test."""
    store = KeyStore(tmp_path / "keys.sqlite", reactor)
    store.startService()
    yield store
    await store.stopService()


@pytest.fixture(params=["sqlite", "postgresql"])
def keys(request: pytest.FixtureRequest, tmp_path: Path, clock: Any) -> Iterator[KeyQueries]:
    """The key store on each database it runs on, which must behave the same.

    On a fresh SQLite file, or a fresh PostgreSQL database of the session's
    server; its clock is the test's ``clock`` (a callable, or a Clock).
    """
    now = clock if callable(clock) else clock.seconds
    if request.param == "sqlite":
        db = KeyDatabase(tmp_path / "state" / "keys.sqlite", clock=now)
        yield db
        db.close()
        return
    import psycopg

    from dockmirror.cluster.keys import PostgresKeyDatabase, schema

    with psycopg.connect(request.getfixturevalue("postgres"), autocommit=True) as conn:
        conn.execute(schema())
        yield PostgresKeyDatabase(conn, now)
