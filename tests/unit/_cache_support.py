"""Helpers for the cache's unit tests: synchronous or hand-driven "threads", fake bodies."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dockmirror.cache.blobs import BlobStore
from dockmirror.cache.index import Index
from dockmirror.metrics import Metrics


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A runner that does the "thread" work at once."""
    return maybeDeferred(f, *args)


class HeldRunner:
    """A runner whose work waits until the test lets it run: a slow disk."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((f, args, d))
        return d

    def run_all(self) -> None:
        """Run the work queued, and the work that queues, until there is none."""
        while self.queue:
            self.run_queued()

    def run_queued(self) -> None:
        """Run only the work queued now."""
        queued, self.queue = self.queue, []
        for f, args, d in queued:
            maybeDeferred(f, *args).chainDeferred(d)


class UpstreamTransport(StringTransport):
    """The upstream connection under a body protocol; remembers pauses."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    """An upstream response whose body the test feeds by hand."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.code = 200
        self.protocol: Any = None
        self.transport = UpstreamTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ResponseDone()))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_store(
    tmp_path: Path,
    *,
    max_size: int | None = None,
    run: Callable[..., Deferred[Any]] = run_now,
    clock: MemoryReactorClock | None = None,
) -> BlobStore:
    clock = clock or MemoryReactorClock()
    index = Index(str(tmp_path / "index.sqlite"), clock, run_now)
    store = BlobStore(str(tmp_path), max_size, index, clock, run, Metrics())
    store.recover(index.load())
    return store


class Claims:
    """A coordinator whose other processes the test plays."""

    shared = True

    def __init__(self) -> None:
        self.elsewhere: set[str] = set()
        self.mine: set[str] = set()
        self.read_elsewhere: set[str] = set()
        self.removed_elsewhere: set[str] = set()
        self.reads: dict[str, float] = {}
        self.usage = 0
        self.promised = 0

    def claim(self, digest: str) -> bool:
        if digest in self.elsewhere:
            return False
        self.mine.add(digest)
        return True

    def release(self, digest: str) -> None:
        self.mine.discard(digest)

    def held_elsewhere(self, digest: str) -> bool:
        return digest in self.elsewhere or digest.rpartition(":")[2] in {
            d.rpartition(":")[2] for d in self.elsewhere
        }

    def start_usage(self, total: int) -> None:
        self.usage = total

    def add_usage(self, delta: int) -> int:
        self.usage += delta
        return self.usage

    def reserve(self, delta: int) -> int:
        return self.add_usage(delta)

    def promise(self, delta: int) -> int:
        self.promised += delta
        return self.promised

    def pin(self, digest: str) -> bool:
        return digest not in self.removed_elsewhere

    def unpin(self, digest: str) -> None:
        pass

    def exclude(self, digest: str) -> bool:
        return digest not in self.read_elsewhere

    def readmit(self, digest: str) -> None:
        pass

    def read_at(self, digest: str, when: float) -> None:
        self.reads[digest] = when

    def last_read(self, digest: str) -> float | None:
        return self.reads.get(digest)

    def close(self) -> None:
        pass
