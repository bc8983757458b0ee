"""Shared unit-test fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort

from dockmirror.auth.keystore import KeyDatabase, KeyStore


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


@pytest_twisted.async_yield_fixture
async def key_store(tmp_path: Path) -> AsyncIterator[KeyStore]:
    """A running KeyStore on a fresh database, stopped (and flushed) after the test."""
    store = KeyStore(KeyDatabase(tmp_path / "keys.sqlite"), reactor)
    store.startService()
    yield store
    await store.stopService()
