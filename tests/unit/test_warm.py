"""Warm rounds in memory: one at a time, and what a round that cannot start gives."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from dockmirror.cache import Cache
from dockmirror.config import CacheConfig, WarmConfig, WarmImage, upstream_plugins
from dockmirror.metrics import Metrics
from dockmirror.routing import Router, Upstream
from dockmirror.warm import Warmer

from ._cache_support import run_now


class HeldPull:
    """A pull side whose prefetches wait until the test lets them end."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[dict[str, Any]]] = []

    async def prefetch(self, route: Any, tag: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        d: Deferred[dict[str, Any]] = Deferred()
        self.waiting.append(d)
        return await d


def warmer(tmp_path: Any, pull: Any, router: Router) -> Warmer:
    clock = MemoryReactorClock()
    cache = Cache(
        CacheConfig(directory=str(tmp_path)), clock, Metrics(), run=run_now, run_index=run_now
    )
    cache.startService()
    images = [WarmImage("hub", "library/x", "1")]
    return Warmer(
        WarmConfig(images=("hub/library/x:1",)), images, router, pull, cache, cache.metrics, clock
    )


def test_asking_while_a_round_runs_joins_it(tmp_path: Any) -> None:
    pull = HeldPull()
    router = Router([Upstream("hub", upstream_plugins()["registry"], "http://up", (), ())], None)
    w = warmer(tmp_path, pull, router)
    first, second = w.run(), w.run()
    assert len(pull.waiting) == 1
    summary = {"digest": "sha256:" + "a" * 64, "fetched_bytes": 5, "errors": [], "not_cached": []}
    pull.waiting[0].callback(summary)
    results = [[], []]
    first.addCallback(results[0].append)
    second.addCallback(results[1].append)
    assert results[0] == results[1] and results[0][0].to_json()["updated"] == 1
    # The next one is a new round.
    third = w.run()
    assert len(pull.waiting) == 2
    pull.waiting[1].callback(summary)
    third.addCallback(results[0].append)
    assert len(results[0]) == 2 and results[0][1] is not results[0][0]


def test_a_round_that_ends_at_once_still_answers(tmp_path: Any) -> None:
    router = Router([], None)  # the image's upstream is gone: it fails at once
    w = warmer(tmp_path, HeldPull(), router)
    results: list[Any] = []
    w.run().addCallback(results.append)
    [result] = results
    assert result.to_json()["failed"] == 1 and not result.ok
    assert w._task is None and w._running is None
