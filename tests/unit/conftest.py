"""Shared unit-test fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock

from dockmirror.auth.keystore import KeyStore


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
