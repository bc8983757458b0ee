"""What every part of the pull side shares: replies, the upstreams' answers, the cache.

Each part (manifests, blobs, referrers, tags) is an :class:`UpstreamAccess`
over the same upstreams, cache and single flight, and returns a
:class:`Reply` for the web layer to send.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from dockmirror import jsontext
from dockmirror.cache import Cache
from dockmirror.errors import STATUS, RegistryError, retry_after, upstream_unavailable
from dockmirror.metrics import Metrics
from dockmirror.pull.upstreams import Upstreams
from dockmirror.routing import Route
from dockmirror.shared import SingleFlight
from dockmirror.streaming import Stream
from dockmirror.upstream import SMALL_BODY_LIMIT, UpstreamError, discard

log = Logger()

HIT, MISS, REVALIDATED, STALE = "HIT", "MISS", "REVALIDATED", "STALE"
#: Which tier a blob hit came from, when not the cache directory: ``X-Cache-Tier: shared``.
CACHE_TIER, SHARED = "X-Cache-Tier", "shared"


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: Stream | None = None


def header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def content_length(response: IResponse) -> int | None:
    """The body length the upstream declared, if it did.

    Twisted moves Content-Length out of ``headers`` into ``length``, except
    for a HEAD: there ``length`` is 0 (no body follows) and the header stays.
    """
    if response.request.method != b"HEAD":
        return None if response.length == UNKNOWN_LENGTH else int(response.length)
    value = header(response, "content-length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def names(response: IResponse, digest: str) -> bool:
    """Whether an upstream's answer for *digest* does not name another digest."""
    return header(response, "docker-content-digest") in (None, digest)


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@dataclass
class PullContext:
    """What the parts of the pull side share."""

    upstreams: Upstreams
    reactor: IReactorTime
    metrics: Metrics
    cache: Cache
    #: Concurrent requests for the same thing share one upstream request.
    flights: SingleFlight = field(default_factory=SingleFlight)


class UpstreamAccess:
    """One part of the pull side: asks the upstreams, and turns their refusals into errors."""

    def __init__(self, context: PullContext) -> None:
        self.upstreams = context.upstreams
        self.cache = context.cache
        self._reactor = context.reactor
        self._metrics = context.metrics
        self._flights = context.flights

    async def _request(
        self,
        route: Route,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> IResponse:
        try:
            return await self.upstreams.request(route, method, path, headers, params)
        except UpstreamError as e:
            raise upstream_failed(route, e) from e

    async def _read(
        self, route: Route, response: IResponse, limit: int = SMALL_BODY_LIMIT
    ) -> bytes:
        """A small body, whole, under the upstream's read timeout.

        One over *limit* or cut short is a 502 from the upstream; an upstream
        that stops sending is a 503.
        """
        try:
            return await self.upstreams.client(route).read(response, limit)
        except UpstreamError as e:
            raise upstream_failed(route, e) from e

    def _count(self, kind: str, x_cache: str) -> None:
        counter = self._metrics.cache_misses if x_cache == MISS else self._metrics.cache_hits
        counter.labels(kind).inc()

    async def _failure(
        self, route: Route, response: IResponse, unknown: str, head: bool
    ) -> RegistryError:
        """The error a client gets for an upstream's non-success answer."""
        body = b""
        if head:
            discard(response)
        else:
            try:
                body = await self.upstreams.client(route).read(response)
            except UpstreamError:
                pass  # the status alone makes the error
        name = route.upstream.name
        code = response.code
        if code == 429 or code >= 500:
            self._metrics.upstream_errors.labels(name, "429" if code == 429 else "5xx").inc()
        if code == 404:
            upstream_code = first_error_code(body)
            if STATUS.get(upstream_code or "") != 404:
                upstream_code = unknown
            return RegistryError(
                upstream_code or unknown,
                f"not found at upstream {name}",
                {"repository": route.repository},
            )
        wait = str(retry_after(header(response, "retry-after"), self._reactor.seconds()))
        if code == 429:
            return RegistryError(
                "TOOMANYREQUESTS",
                f"upstream {name} is rate-limiting this mirror; try again later",
                {"upstream": name, "retry_after": int(wait)},
                headers={"Retry-After": wait},
            )
        if code == 503:
            error = upstream_unavailable(name, "answered 503")
            if response.headers.hasHeader("retry-after"):
                error.headers["Retry-After"] = wait
            return error
        if code in (401, 403):
            return RegistryError(
                "DENIED",
                f"upstream {name} refused access to {route.repository}",
                {"upstream": name, "status": code},
            )
        if code == 416:
            return RegistryError("RANGE_INVALID", "requested range not satisfiable")
        if code in (400, 405) or 500 <= code:
            return upstream_unavailable(name, f"answered {code}", 502)
        return upstream_unavailable(name, f"answered unexpected status {code}", 502)


def upstream_failed(route: Route, error: UpstreamError) -> RegistryError:
    """Log why an upstream failed a request; the error its client gets."""
    log.warn(
        "upstream {upstream} failed for {repository}: {error}",
        upstream=route.upstream.name,
        repository=route.repository,
        error=str(error),
    )
    return upstream_unavailable(route.upstream.name, str(error), error.status)


def transient(error: RegistryError) -> bool:
    """Whether an upstream error is one that serving a stale answer rides out."""
    return error.status == 429 or error.status >= 500


def first_error_code(body: bytes) -> str | None:
    try:
        return str(jsontext.loads(body)["errors"][0]["code"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
