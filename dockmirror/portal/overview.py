"""What the operator view shows: the cache, the upstreams' health, and recent traffic.

:class:`TrafficSampler` adds the requests this process answered to the key
store's hourly counts once a minute, so that the chart covers every request
(anonymous ones too) and every process sharing the key store.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dockmirror.auth.keys import HOUR, KeyStoreError, iso_time
from dockmirror.auth.keystore import KeyStore
from dockmirror.metrics import Metrics
from dockmirror.routing import Upstream
from dockmirror.upstream import discard

log = Logger()

SAMPLE_INTERVAL = 60.0
#: Seconds an upstream probe may take, and how long its answer is reused.
PROBE_TIMEOUT = 5
PROBE_REUSE = 30.0


def _total(metrics: Metrics, name: str) -> float:
    return sum(
        sample.value
        for metric in metrics.registry.collect()
        for sample in metric.samples
        if sample.name == name
    )


class TrafficSampler(service.Service):
    """Writes the requests answered since the last sample into the hourly counts."""

    def __init__(self, metrics: Metrics, keys: KeyStore, reactor: Any) -> None:
        self._metrics = metrics
        self._keys = keys
        self._reactor = reactor
        self._counted = 0.0
        self._loop = LoopingCall(self.sample)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._counted = _total(self._metrics, "dockmirror_http_requests_total")
        self._loop.start(SAMPLE_INTERVAL, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self.sample()

    def sample(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._sample())

    async def _sample(self) -> None:
        total = _total(self._metrics, "dockmirror_http_requests_total")
        new = int(total - self._counted)
        if new <= 0:
            return
        self._counted = total
        try:
            await self._keys.add_traffic(int(self._reactor.seconds()) // HOUR, new)
        except KeyStoreError as e:
            self._counted -= new
            log.error("cannot write the hourly request count: {error}", error=str(e))


class UpstreamProbe:
    """Asks each upstream's ``/v2/`` whether it answers, at most every half minute."""

    def __init__(self, upstreams: list[Upstream], clients: dict[str, Any], reactor: Any) -> None:
        self._upstreams = upstreams
        self._clients = clients
        self._reactor = reactor
        self._last: tuple[float, list[dict[str, Any]]] | None = None

    async def health(self) -> list[dict[str, Any]]:
        now = self._reactor.seconds()
        if self._last is None or now - self._last[0] > PROBE_REUSE:
            results = await DeferredList(
                [Deferred.fromCoroutine(self._probe(u)) for u in self._upstreams],
                consumeErrors=True,
            )
            self._last = (now, [r for ok, r in results if ok])
        return self._last[1]

    async def _probe(self, upstream: Upstream) -> dict[str, Any]:
        url = upstream.base_url(None)
        result: dict[str, Any] = {"name": upstream.name, "url": url}
        started = time.monotonic()
        try:
            response = await self._clients[upstream.name].get(f"{url}/v2/", timeout=PROBE_TIMEOUT)
        except (CancelledError, Exception) as e:  # noqa: BLE001 - any failure is the finding
            reason = "timed out" if isinstance(e, CancelledError) else type(e).__name__
            return {**result, "up": False, "detail": f"unreachable ({reason})"}
        discard(response)
        elapsed = round((time.monotonic() - started) * 1000)
        up = response.code in (200, 401)
        return {**result, "up": up, "detail": f"HTTP {response.code}", "latencyMs": elapsed}


def cache_summary(stats: dict[str, Any], metrics: Metrics) -> dict[str, Any]:
    """The cache's size and quota, its hit ratio and the traffic it saved (since start)."""
    hits = sum(stats["hits"].values())
    misses = sum(stats["misses"].values())
    from_cache = int(_total(metrics, "dockmirror_cache_served_bytes_total"))
    from_upstreams = int(_total(metrics, "dockmirror_upstream_received_bytes_total"))
    moved = from_cache + from_upstreams
    return {
        "size": stats["size"],
        "maxSize": stats["max_size"],
        "blobs": stats["blobs"],
        "hits": hits,
        "misses": misses,
        "hitRatio": hits / (hits + misses) if hits + misses else None,
        "bytesFromCache": from_cache,
        "bytesFromUpstreams": from_upstreams,
        "savedRatio": from_cache / moved if moved else None,
    }


def hourly_series(counts: dict[int, int], now: float, hours: int = 24) -> list[dict[str, Any]]:
    """*hours* hourly buckets ending with the current one, zeros included."""
    current = int(now) // HOUR
    return [
        {"hour": iso_time(h * HOUR), "requests": counts.get(h, 0)}
        for h in range(current - hours + 1, current + 1)
    ]
