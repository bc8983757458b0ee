"""Prometheus metrics, all prefixed ``dockmirror_``.

One :class:`Metrics` object is made per service and handed to the layers that
count; it owns its own ``CollectorRegistry`` so tests can make fresh ones.
"""

from __future__ import annotations

import ipaddress
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from twisted.web.resource import Resource
from twisted.web.server import Request

from dockmirror.errors import RegistryError

disable_created_metrics()

#: Set by the supervisor for its workers: where each writes its metrics.
#: ``prometheus_client`` reads it when first imported.
MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"


def mark_worker_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges; its counters keep counting in the totals."""
    multiprocess.mark_process_dead(pid, directory)


def service_registry(metrics: Metrics) -> CollectorRegistry:
    """What ``/metrics`` shows: this process's metrics, or every worker's added up."""
    directory = os.environ.get(MULTIPROCESS_DIRECTORY)
    if directory is None:
        return metrics.registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, directory)
    return registry


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "dockmirror_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.cache_hits = Counter(
            "dockmirror_cache_hits",
            "Requests answered from the cache, by kind.",
            ["kind"],
            registry=r,
        )
        self.cache_misses = Counter(
            "dockmirror_cache_misses",
            "Requests that had to go upstream, by kind.",
            ["kind"],
            registry=r,
        )
        self.bytes_from_cache = Counter(
            "dockmirror_cache_served_bytes",
            "Bytes sent to clients from the cache.",
            registry=r,
        )
        self.bytes_from_upstream = Counter(
            "dockmirror_upstream_received_bytes",
            "Body bytes received from upstreams.",
            ["upstream"],
            registry=r,
        )
        self.bytes_from_nodes = Counter(
            "dockmirror_cluster_received_bytes",
            "Blob bytes received from the other nodes of the cluster.",
            registry=r,
        )
        self.bytes_from_storage = Counter(
            "dockmirror_storage_received_bytes",
            "Blob bytes read from the shared storage tier ([storage]).",
            registry=r,
        )
        self.storage_uploads = Counter(
            "dockmirror_storage_uploads",
            "Blobs and manifests written to the shared storage tier, by result.",
            ["result"],
            registry=r,
        )
        self.storage_evictions = Counter(
            "dockmirror_storage_evictions",
            "Objects deleted from the shared storage tier (quota, corruption, purges).",
            registry=r,
        )
        self.fills_in_flight = Gauge(
            "dockmirror_cache_fills_in_flight",
            "Blob fills from upstream now running.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.digest_mismatches = Counter(
            "dockmirror_digest_mismatches",
            "Upstream content that did not match its digest.",
            ["upstream"],
            registry=r,
        )
        self.evictions = Counter(
            "dockmirror_cache_evictions",
            "Blobs evicted to stay within the cache quota.",
            registry=r,
        )
        self.evicted_bytes = Counter(
            "dockmirror_cache_evicted_bytes",
            "Bytes evicted to stay within the cache quota.",
            registry=r,
        )
        self.cache_passthrough = Counter(
            "dockmirror_cache_passthrough",
            "Blobs streamed to a client without being cached, by reason.",
            ["reason"],
            registry=r,
        )
        self.cache_stale = Counter(
            "dockmirror_cache_stale",
            "Expired manifests served because the upstream could not revalidate them.",
            registry=r,
        )
        self.cache_size = Gauge(
            "dockmirror_cache_size_bytes",
            "Bytes of blobs held in the cache.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.upstream_latency = Histogram(
            "dockmirror_upstream_response_seconds",
            "Time from sending an upstream request to its response headers.",
            ["upstream"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "dockmirror_upstream_errors",
            "Upstream requests that failed, by reason (unreachable, 5xx, 429, ...).",
            ["upstream", "reason"],
            registry=r,
        )
        self.upstream_ratelimit_remaining = Gauge(
            "dockmirror_upstream_ratelimit_remaining",
            "The last ratelimit-remaining an upstream announced.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.endpoint_state = Gauge(
            "dockmirror_upstream_endpoint_state",
            "Circuit breaker of each configured upstream endpoint (host:port):"
            " 0 closed (in use), 1 half-open (being probed), 2 open (skipped).",
            ["upstream", "endpoint"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.endpoint_failures = Counter(
            "dockmirror_upstream_endpoint_failures",
            "Requests an upstream endpoint failed (unreachable, timeout, 5xx, 429).",
            ["upstream", "endpoint"],
            registry=r,
        )
        self.ranged_parts = Counter(
            "dockmirror_upstream_ranged_parts",
            "Ranges of large blobs fetched in parallel, by outcome: fetched; retried (after"
            " a failure, from where it stopped); resolved (the blob's URL asked again after a"
            " 401 or 403); fallback (a fill that went on in one stream, Range being ignored).",
            ["upstream", "outcome"],
            registry=r,
        )
        self.warm_images = Gauge(
            "dockmirror_warm_images",
            "Images of the warm list, by what the last round did with them.",
            ["result"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.warm_bytes = Counter(
            "dockmirror_warm_fetched_bytes",
            "Bytes of blobs warm rounds fetched from upstreams.",
            registry=r,
        )
        self.warm_failures = Counter(
            "dockmirror_warm_failures",
            "Images a warm round could not warm.",
            registry=r,
        )
        self.warm_rounds = Counter(
            "dockmirror_warm_rounds",
            "Warm rounds run, by result (ok: every image warmed).",
            ["result"],
            registry=r,
        )
        self.warm_last_success = Gauge(
            "dockmirror_warm_last_success_timestamp_seconds",
            "When the last warm round that warmed every image ended (Unix time).",
            registry=r,
            multiprocess_mode="max",
        )
        self.warm_kept_bytes = Gauge(
            "dockmirror_warm_kept_bytes",
            "Bytes of warm images' blobs kept from eviction.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.auth = Counter(
            "dockmirror_auth_attempts",
            "Authentication attempts, by result.",
            ["result"],
            registry=r,
        )


class MetricsResource(Resource):
    """``/metrics`` in Prometheus text format, optionally limited to some networks."""

    isLeaf = True

    def __init__(self, metrics: Metrics, allow: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._registry = service_registry(metrics)
        self._allow = [ipaddress.ip_network(cidr, strict=False) for cidr in allow]

    def _allowed(self, request: Request) -> bool:
        if not self._allow:
            return True
        address = request.getClientAddress()
        host = getattr(address, "host", None)
        if host is None:
            return False
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._allow)

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader("Allow", "GET, HEAD")
            request.setHeader("Content-Type", "application/json")
            return RegistryError("UNSUPPORTED", "metrics are read with GET").body()
        head = request.method == b"HEAD"
        request.method = b"GET"  # HEAD is answered here: Twisted's own logs the request
        body = bytes(super().render(request))
        if not head:
            return body
        request.method = b"HEAD"
        request.setHeader("Content-Length", str(len(body)))
        return b""

    def render_GET(self, request: Request) -> bytes:
        if not self._allowed(request):
            request.setResponseCode(403)
            request.setHeader("Content-Type", "application/json")
            return RegistryError("DENIED", "metrics are not served to this address").body()
        request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
        return generate_latest(self._registry)
