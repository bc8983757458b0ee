"""The pull side of the registry API, answered from the cache and the upstreams.

Each method returns a :class:`Reply` for the web layer to send; a blob body is
a stream (a :class:`~dockmirror.cache.blobs.BlobReader` from the cache, or a
:class:`~dockmirror.streaming.BodyStream` from the upstream) that the web
layer points at the client's request.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from dockmirror.cache import Cache, origin_of
from dockmirror.cache.fill import CacheWriteError, Fill
from dockmirror.cache.follow import FollowedFill
from dockmirror.cache.manifests import (
    INDEX_TYPES,
    OCI_INDEX,
    TagEntry,
    accepted,
    could_be_manifest,
    manifest_media_type,
    references,
)
from dockmirror.cache.parts import PartBody, RangedFill
from dockmirror.cache.referrers import ReferrersEntry, filtered_list, referrers_list
from dockmirror.egress import Egress
from dockmirror.endpoints import Breaker, Endpoint, EndpointSet
from dockmirror.errors import STATUS, RegistryError, retry_after, upstream_unavailable
from dockmirror.metrics import Metrics
from dockmirror.ranged import RangedFetch, RangeSupport
from dockmirror.reference import HEX_LENGTH, TAG_RE, is_digest, parse_image_reference
from dockmirror.routing import Route, Router, Upstream
from dockmirror.shared import SingleFlight
from dockmirror.streaming import BodyStream, Stream, StreamError, content_range_start
from dockmirror.upstream import (
    SMALL_BODY_LIMIT,
    UpstreamClient,
    UpstreamError,
    discard,
)

log = Logger()

#: The largest manifest accepted from an upstream (as distribution's limit).
MANIFEST_LIMIT = 4 << 20

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
)
DEFAULT_ACCEPT = ", ".join(MANIFEST_TYPES)


def negotiable(accept: str | None) -> str:
    """The Accept header to send upstream for a client's manifest request.

    A client that names no manifest type (curl's ``*/*``) gets every type:
    some registries answer 404 to a request that does not name the type a
    manifest is stored as.
    """
    if accept and any(t in accept for t in MANIFEST_TYPES):
        return accept
    return DEFAULT_ACCEPT


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: Stream | None = None


def _header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def _content_length(response: IResponse) -> int | None:
    """The body length the upstream declared, if it did.

    Twisted moves Content-Length out of ``headers`` into ``length``, except
    for a HEAD: there ``length`` is 0 (no body follows) and the header stays.
    """
    if response.request.method != b"HEAD":
        return None if response.length == UNKNOWN_LENGTH else int(response.length)
    value = _header(response, "content-length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def _names(response: IResponse, digest: str) -> bool:
    """Whether an upstream's answer for *digest* does not name another digest."""
    return _header(response, "docker-content-digest") in (None, digest)


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


#: Upstream clients kept: one per upstream and base URL, the most recently used.
CLIENTS_LIMIT = 64


class Upstreams:
    """The clients of each upstream: its endpoints (URL and mirrors), over its egress.

    A wildcard alias (``*.gcr.io``) names any number of hosts, each with a
    client of its own and no mirrors; only the :data:`CLIENTS_LIMIT` most
    recently used of those clients are kept.
    """

    def __init__(self, egress: dict[str, Egress], reactor: IReactorTime, metrics: Metrics) -> None:
        self._egress = egress
        self._reactor = reactor
        self._metrics = metrics
        self._clients: OrderedDict[tuple[str, str], UpstreamClient] = OrderedDict()
        self._endpoint_sets: dict[str, EndpointSet] = {}

    def _client(
        self,
        upstream: Upstream,
        base_url: str,
        username: str | None,
        password: str | None,
        token_realms: tuple[str, ...],
    ) -> UpstreamClient:
        return UpstreamClient(
            upstream.name,
            base_url,
            self._egress[upstream.name].http,
            self._reactor,
            self._metrics,
            username,
            password,
            token_realms=token_realms,
            trusted=self._egress[upstream.name].tls.trusted,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.read_timeout,
        )

    def endpoint_set(self, upstream: Upstream) -> EndpointSet:
        """The endpoints of *upstream*'s configured URL: it, then its mirrors.

        A mirror gets its own credentials only, and the primary's token
        realms are not its.
        """
        endpoints = self._endpoint_sets.get(upstream.name)
        if endpoints is None:
            primary = Endpoint(
                self._client(
                    upstream,
                    upstream.configured_url,
                    upstream.username,
                    upstream.password,
                    upstream.token_realms,
                ),
                primary=True,
                trust_tags=True,
                breaker=Breaker(self._reactor),
            )
            mirrors = [
                Endpoint(
                    self._client(upstream, m.url.rstrip("/"), m.username, m.password, ()),
                    primary=False,
                    trust_tags=m.trust_tags,
                    breaker=Breaker(self._reactor),
                )
                for m in upstream.mirrors
            ]
            endpoints = EndpointSet(
                upstream.name, [primary, *mirrors], self._reactor, self._metrics
            )
            self._endpoint_sets[upstream.name] = endpoints
        return endpoints

    def client(self, route: Route) -> UpstreamClient:
        key = (route.upstream.name, route.base_url)
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        upstream = route.upstream
        client = self._clients[key] = self._client(
            upstream, route.base_url, upstream.username, upstream.password, upstream.token_realms
        )
        while len(self._clients) > CLIENTS_LIMIT:
            self._clients.popitem(last=False)
        return client

    async def request(
        self,
        route: Route,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> IResponse:
        """Send ``METHOD /v2/<repository>/<path>`` where *route* goes, falling back to mirrors."""
        if route.base_url == route.upstream.configured_url:
            endpoints = self.endpoint_set(route.upstream)
            return await endpoints.request(method, route.repository, path, headers, params)
        return await self.client(route).request(method, route.repository, path, headers, params)


#: Times a blob request tries to join or start a fill before giving up.
FILL_ATTEMPTS = 3
#: Blobs of one manifest fetched at once by :meth:`PullService.prefetch`.
PREFETCH_PARALLEL = 4

HIT, MISS, REVALIDATED, STALE = "HIT", "MISS", "REVALIDATED", "STALE"
#: Which tier a blob hit came from, when not the cache directory: ``X-Cache-Tier: shared``.
CACHE_TIER, SHARED = "X-Cache-Tier", "shared"


@dataclass
class _Source:
    """Where a blob's bytes will come from."""

    fill: Fill | FollowedFill | None = None  # being filled (None: cached)
    lead: bool = False  # this request started the fill
    passthrough: str | None = None  # why it is streamed uncached


class PullService:
    """Answers pulls from the cache, going upstream for what it lacks.

    Blobs: a cached blob is served from its file; a missing one is filled
    once, however many clients ask, each reading the file as it grows.
    Manifests: by digest from the cache; by tag for ``manifest_ttl``
    seconds, then revalidated with a HEAD.  Every reply says ``X-Cache``.
    """

    def __init__(
        self, upstreams: Upstreams, reactor: IReactorTime, metrics: Metrics, cache: Cache
    ) -> None:
        self.upstreams = upstreams
        self.cache = cache
        self._reactor = reactor
        self._metrics = metrics
        self._flights = SingleFlight()
        #: Upstreams seen to ignore Range, whose large blobs go in one stream for a while.
        self.ranges = RangeSupport(reactor)

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
            raise _upstream_failed(route, e) from e

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
            raise _upstream_failed(route, e) from e

    def _count(self, kind: str, x_cache: str) -> None:
        counter = self._metrics.cache_misses if x_cache == MISS else self._metrics.cache_hits
        counter.labels(kind).inc()

    # --- manifests -----------------------------------------------------------------

    async def manifest(self, route: Route, reference: str, accept: str | None, head: bool) -> Reply:
        reply = await self._manifest(route, origin_of(route), reference, accept, head)
        self._count("manifest", reply.headers["X-Cache"])
        if reply.headers["X-Cache"] == STALE:
            self._metrics.cache_stale.inc()
        return reply

    async def _manifest(
        self, route: Route, origin: str, reference: str, accept: str | None, head: bool
    ) -> Reply:
        manifests = self.cache.manifests
        # Concurrent requests for the same thing share one upstream request.
        key = (origin, reference, negotiable(accept), head)
        if is_digest(reference):
            shared = (
                self.cache.storage is not None
                and not manifests.has(reference)
                and await self._flights.run(
                    ("stored", origin, reference),
                    lambda: self._stored_manifest(route, origin, reference, accept),
                )
            )
            if manifests.has(reference):
                if not self.cache.blobs.allowed(origin, reference):
                    await self._flights.run(
                        ("confirm", *key),
                        lambda: self._confirm_manifest(route, origin, reference, accept),
                    )
                reply = self._cached_manifest(reference, HIT, head)
                if reply is not None:
                    if shared:
                        reply.headers[CACHE_TIER] = SHARED
                    return reply
        else:
            entry = manifests.tag(origin, reference, accepted(accept))
            if (entry is None or not manifests.fresh(entry)) and await manifests.adopt_tag(
                origin, reference
            ):
                entry = manifests.tag(origin, reference, accepted(accept))
            reply = None
            if entry is not None and manifests.fresh(entry):
                reply = self._cached_manifest(entry.digest, HIT, head)
            elif entry is not None:
                reply = await self._flights.run(
                    ("revalidate", *key),
                    lambda: self._revalidate(route, origin, reference, entry, accept, head),
                )
            if reply is not None:
                return reply
        return await self._flights.run(
            ("fetch", *key),
            lambda: self._fetch_manifest(route, origin, reference, accept, head),
        )

    async def _fetch_manifest(
        self, route: Route, origin: str, reference: str, accept: str | None, head: bool
    ) -> Reply:
        """A manifest from upstream, fetched by one worker for all.

        Docker Hub counts each manifest GET against the pull limit: the
        worker that claims the fetch asks, and the others read the manifest
        it cached.  A HEAD costs nothing and caches nothing.
        """
        if head:
            return await self._upstream_manifest(route, origin, reference, accept, head)
        flights = self.cache.flights
        key = "\n".join((origin, reference, negotiable(accept)))
        fetched = await flights.wait(key)
        if fetched is not None and len(fetched) == 4:  # taken in, if sound, as it was heard
            digest = fetched[2]
            if self.cache.manifests.has(digest) and self.cache.blobs.allowed(origin, digest):
                reply = self._cached_manifest(digest, MISS, head)
                if reply is not None:
                    return reply
        result = None
        try:
            reply = await self._upstream_manifest(route, origin, reference, accept, head)
            digest = reply.headers["Docker-Content-Digest"]
            if self.cache.manifests.has(digest):
                result = [origin, reference, digest, reply.headers["Content-Type"]]
            return reply
        finally:
            flights.done(key, result)

    def _cached_manifest(self, digest: str, x_cache: str, head: bool) -> Reply | None:
        try:
            cached = self.cache.manifests.get(digest)
        except OSError as e:
            log.error("cannot read cached {digest}: {error}", digest=digest, error=e.strerror)
            raise RegistryError("UNAVAILABLE", "the cache cannot be read now", status=503) from e
        if cached is None:
            return None
        body, media_type = cached
        headers = {
            "Content-Type": media_type,
            "Content-Length": str(len(body)),
            "Docker-Content-Digest": digest,
            "ETag": f'"{digest}"',
            "X-Cache": x_cache,
        }
        return Reply(200, headers, b"" if head else body)

    async def _stored_manifest(
        self, route: Route, origin: str, digest: str, accept: str | None
    ) -> bool:
        """Take a manifest into the cache from the shared storage tier; whether it was there.

        It is taken only if it matches its digest, and once the upstream
        repository confirmed it has it (a ``HEAD``, which Docker Hub does not
        count as a pull).
        """
        assert self.cache.storage is not None
        found = await self.cache.storage.read_small(digest, MANIFEST_LIMIT)
        if found is None:
            return False
        body, declared = found
        media_type = manifest_media_type(body, declared)
        if compute_digest(body, digest.partition(":")[0]) != digest or media_type is None:
            log.error("stored manifest {digest} is not that manifest: ignored", digest=digest)
            return False
        await self._confirm_manifest(route, origin, digest, accept)
        await self.cache.manifests.put(origin, digest, digest, media_type, body)
        return True

    async def _confirm_manifest(
        self, route: Route, origin: str, digest: str, accept: str | None
    ) -> None:
        """Check that this upstream repository has a manifest cached through another."""
        response = await self._request(
            route, "HEAD", f"manifests/{digest}", {"Accept": negotiable(accept)}
        )
        if response.code != 200:
            raise await self._failure(route, response, "MANIFEST_UNKNOWN", True)
        discard(response)
        content_type = _header(response, "content-type")
        if not (could_be_manifest(content_type) and _names(response, digest)):
            raise self._not_a_manifest(route, digest, f"a {content_type} page")
        self.cache.blobs.allow(origin, digest)

    async def refresh_tag(self, route: Route, tag: str) -> Reply:
        """A tag's manifest as its upstream has it now, whatever the cache holds.

        The upstream is asked with a HEAD, which does not count against
        Docker Hub's pull limit; the manifest is fetched only when the HEAD
        names one that is not cached.
        """
        origin = origin_of(route)
        key = (origin, tag, DEFAULT_ACCEPT, False)
        entry = self.cache.manifests.tag(origin, tag, None)
        reply = await self._flights.run(
            ("revalidate", *key),
            lambda: self._revalidate(route, origin, tag, entry, None, False),
        )
        if reply is None:
            reply = await self._flights.run(
                ("fetch", *key),
                lambda: self._fetch_manifest(route, origin, tag, None, False),
            )
        if entry is not None and entry.digest != reply.headers.get("Docker-Content-Digest"):
            self.cache.manifests.expire_tag(origin, tag, reply.headers["Content-Type"])
        return reply

    async def _revalidate(
        self,
        route: Route,
        origin: str,
        tag: str,
        entry: TagEntry | None,
        accept: str | None,
        head: bool,
    ) -> Reply | None:
        """Check a tag with a HEAD; None when the manifest must be fetched.

        An expired *entry* is served stale when the upstream fails.
        """
        manifests = self.cache.manifests
        try:
            response = await self._request(
                route, "HEAD", f"manifests/{tag}", {"Accept": negotiable(accept)}
            )
        except RegistryError as e:
            return self._stale(entry, e, head)
        if response.code != 200:
            error = await self._failure(route, response, "MANIFEST_UNKNOWN", True)
            if response.code == 429 or response.code >= 500:
                return self._stale(entry, error, head)
            if response.code == 404:
                manifests.forget_tag(origin, tag)
            raise error
        discard(response)
        if not could_be_manifest(_header(response, "content-type")):
            what = f"a {_header(response, 'content-type')} page"
            return self._stale(entry, self._not_a_manifest(route, tag, what), head)
        digest = _header(response, "docker-content-digest")
        if digest is None or not manifests.has(digest):
            return None
        if entry is not None and digest == entry.digest:
            media_type = entry.media_type
        else:
            media_type = manifests.get_type(digest)
        self.cache.blobs.allow(origin, digest)
        manifests.set_tag(origin, tag, digest, media_type)
        return self._cached_manifest(digest, REVALIDATED, head)

    def _stale(self, entry: TagEntry | None, error: RegistryError, head: bool) -> Reply:
        if entry is None or not self.cache.serve_stale:
            raise error
        reply = self._cached_manifest(entry.digest, STALE, head)
        if reply is None:
            raise error
        log.info("serving stale {digest}: {error}", digest=entry.digest, error=error.message)
        return reply

    async def _upstream_manifest(
        self, route: Route, origin: str, reference: str, accept: str | None, head: bool
    ) -> Reply:
        response = await self._request(
            route,
            "HEAD" if head else "GET",
            f"manifests/{reference}",
            {"Accept": negotiable(accept)},
        )
        if response.code != 200:
            raise await self._failure(route, response, "MANIFEST_UNKNOWN", head)
        declared = _header(response, "content-type")
        if not could_be_manifest(declared):
            discard(response)
            raise self._not_a_manifest(route, reference, f"a {declared} page")
        content_type = _media_type(declared)
        digest = _header(response, "docker-content-digest")
        if head:
            discard(response)
            headers = {"Content-Type": content_type, "X-Cache": MISS}
            if digest:
                headers["Docker-Content-Digest"] = digest
            length = _content_length(response)
            if length is not None:
                headers["Content-Length"] = str(length)
            return Reply(200, headers)
        body = await self._read(route, response, MANIFEST_LIMIT)
        expected = reference if is_digest(reference) else digest
        algorithm = expected.partition(":")[0] if expected else "sha256"
        actual = compute_digest(body, algorithm if algorithm in HEX_LENGTH else "sha256")
        if expected and actual != expected:
            self._metrics.digest_mismatches.labels(route.upstream.name).inc()
            log.error(
                "manifest {reference} of {repository} from {upstream} hashes to {actual}",
                reference=reference,
                repository=route.repository,
                upstream=route.upstream.name,
                actual=actual,
            )
            raise upstream_unavailable(
                route.upstream.name, f"manifest does not match its digest {expected}", 502
            )
        media_type = manifest_media_type(body, declared)
        if media_type is None:
            what = f"{len(body)} bytes of {declared or 'no declared type'}"
            raise self._not_a_manifest(route, reference, what)
        await self.cache.manifests.put(origin, reference, actual, media_type, body)
        if self.cache.storage is not None:
            self.cache.storage.put(actual, body, media_type)
        return Reply(
            200,
            {
                "Content-Type": media_type,
                "Docker-Content-Digest": actual,
                "ETag": f'"{actual}"',
                "X-Cache": MISS,
            },
            body,
        )

    def _not_a_manifest(self, route: Route, reference: str, what: str) -> RegistryError:
        """An upstream's 200 that is no manifest: a captive portal, a login page."""
        log.warn(
            "upstream {upstream} answered {what} for manifest {reference} of {repository}",
            upstream=route.upstream.name,
            what=what,
            reference=reference,
            repository=route.repository,
        )
        return upstream_unavailable(route.upstream.name, "the answer is not a manifest", 502)

    # --- referrers -----------------------------------------------------------------

    async def referrers(
        self, route: Route, digest: str, artifact_type: str | None, head: bool
    ) -> Reply:
        """The OCI 1.1 referrers list of *digest*, kept for ``manifest_ttl`` like a tag.

        An upstream without the API answers 404, and so does the mirror:
        clients then look for the tag schema (``sha256-<hex>.sig``).
        """
        origin = origin_of(route)
        key = (origin, digest, artifact_type or "")
        cache = self.cache.referrers
        entry = cache.get(key)
        if entry is not None and cache.fresh(entry):
            x_cache = HIT
        else:
            try:
                entry = await self._flights.run(
                    ("referrers", *key),
                    lambda: self._upstream_referrers(route, key, artifact_type),
                )
                x_cache = MISS
            except RegistryError as e:
                if entry is None or not self.cache.serve_stale or not _transient(e):
                    raise
                log.info("serving stale referrers of {digest}: {error}", digest=digest, error=e)
                x_cache = STALE
        self._count("referrers", x_cache)
        headers = {
            "Content-Type": OCI_INDEX,
            "Content-Length": str(len(entry.body)),
            "X-Cache": x_cache,
        }
        if entry.filtered:
            headers["OCI-Filters-Applied"] = "artifactType"
        return Reply(200, headers, b"" if head else entry.body)

    async def _upstream_referrers(
        self, route: Route, key: tuple[str, str, str], artifact_type: str | None
    ) -> ReferrersEntry:
        """Ask the upstream, following its pages (``Link: <...>; rel="next"``) into one list."""
        origin, digest, _ = key
        params = [("artifactType", artifact_type)] if artifact_type else None
        descriptors: list[dict[str, Any]] = []
        for page in range(REFERRERS_PAGES):
            response = await self._request(
                route, "GET", f"referrers/{digest}", {"Accept": OCI_INDEX}, params
            )
            if response.code != 200:
                error = await self._failure(route, response, "MANIFEST_UNKNOWN", False)
                if response.code == 404 and page == 0:
                    self.cache.referrers.forget(key)
                    error = RegistryError(
                        error.code,
                        f"upstream {route.upstream.name} has no referrers API or no such"
                        " manifest; look for the tag schema (sha256-<hex> tags)",
                        error.detail,
                    )
                raise error
            body = await self._read(route, response, MANIFEST_LIMIT)
            content_type = _header(response, "content-type")
            listed = referrers_list(body, content_type)
            if listed is None:
                log.warn(
                    "upstream {upstream} answered {size} bytes of {content_type} for the"
                    " referrers of {digest} in {repository}: not an image index",
                    upstream=route.upstream.name,
                    size=len(body),
                    content_type=content_type,
                    digest=digest,
                    repository=route.repository,
                )
                raise upstream_unavailable(
                    route.upstream.name, "the answer is not a referrers list", 502
                )
            if page == 0:
                applied = _header(response, "oci-filters-applied") == "artifactType"
            descriptors.extend(listed)
            params = _next_page(route, digest, _header(response, "link"))
            if params is None:
                break
        else:
            raise upstream_unavailable(
                route.upstream.name, f"more than {REFERRERS_PAGES} pages of referrers", 502
            )
        if artifact_type is not None and not applied:
            # The upstream ignored the filter; apply it here, and say so.
            body = filtered_list(descriptors, artifact_type)
        elif page > 0:
            body = filtered_list(descriptors, None)
        if len(body) > MANIFEST_LIMIT:
            raise upstream_unavailable(route.upstream.name, "too many referrers", 502)
        return self.cache.referrers.put(key, body, artifact_type is not None)

    # --- blobs ---------------------------------------------------------------------

    async def blob(self, route: Route, digest: str, head: bool, range_header: str | None) -> Reply:
        origin = origin_of(route)
        store = self.cache.blobs
        if head and not store.has(digest) and store.filling(digest) is None:
            size = await self._blob_head(route, origin, digest)
            if size is not None:
                self._admit(digest, size)
            self._count("blob", MISS)
            headers = _blob_headers(digest, MISS)
            if size is not None:
                headers["Content-Length"] = str(size)
            return Reply(200, headers)
        if not head and not store.has(digest) and store.filling(digest) is None:
            redirect = await self._redirect(route, origin, digest)
            if redirect is not None:
                return redirect
        source = await self._source(route, origin, digest)
        if source.passthrough is not None:
            self._metrics.cache_passthrough.labels(source.passthrough).inc()
            stored = None if head else await self._stored(route, origin, digest, range_header)
            return stored or await self._passthrough(route, origin, digest, head, range_header)
        shared = isinstance(source.fill, Fill) and source.fill.from_storage
        x_cache = MISS if source.lead and not shared else HIT
        self._count("blob", x_cache)
        store.touch(digest)
        size = source.fill.size if source.fill is not None else store.size_of(digest)
        assert size is not None
        headers = _blob_headers(digest, x_cache)
        if shared:
            headers[CACHE_TIER] = SHARED
        span = _parse_range(range_header, size)
        start, end = span or (0, size)
        headers["Content-Length"] = str(end - start)
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if head:
            return Reply(206 if span else 200, headers)
        count = self._metrics.bytes_from_cache.inc if x_cache == HIT else _ignore
        try:
            reader = store.reader(digest, start, end, count)
        except OSError as e:
            log.error("cannot open cached {digest}: {error}", digest=digest, error=e.strerror)
            if source.fill is None and e.errno == errno.ENOENT:
                store.forget(digest)  # gone from the disk; a transient error keeps it
            raise upstream_unavailable(route.upstream.name, "cache read failed", 503) from e
        return Reply(206 if span else 200, headers, stream=reader)

    async def _source(self, route: Route, origin: str, digest: str) -> _Source:
        """Find the blob in the cache or in a fill, starting one if need be."""
        store = self.cache.blobs
        error: Exception | None = None
        for _ in range(FILL_ATTEMPTS):
            if not store.allowed(origin, digest) or store.size_of(digest, origin) is None:
                if not await store.proved_elsewhere(origin, digest):
                    await self._blob_head(route, origin, digest)
            if store.has(digest):
                return _Source()
            fill = store.filling(digest)
            lead = fill is None
            if fill is None:
                size = store.size_of(digest, origin)
                if size is None:
                    return _Source(passthrough="size unknown")
                reason = self._admit(digest, size)
                parts = self._parts(route.upstream, size)
                started = reason or store.begin_fill(digest, size, route.upstream.name, parts)
                if isinstance(started, str):
                    return _Source(passthrough=started)
                fill = started
                if isinstance(fill, Fill):
                    Deferred.fromCoroutine(self._fill(fill, route, origin)).addErrback(
                        _fill_crashed, fill
                    )
                else:  # another worker fills it
                    lead = False
            try:
                await fill.ready.wait()
            except CacheWriteError:
                return _Source(passthrough="cache write failed")
            except (RegistryError, StreamError) as e:
                # What the upstream refused is final for the request that asked;
                # a follower asks through its own repository, and a fill that
                # could not start (the size changed, the disk failed) is retried.
                error = e
                if lead and isinstance(e, RegistryError):
                    break
                continue
            return _Source(fill, lead)
        if isinstance(error, RegistryError):
            raise error
        raise upstream_unavailable(route.upstream.name, str(error), 502)

    async def _redirect(self, route: Route, origin: str, digest: str) -> Reply | None:
        """A 307 to the shared storage tier, if it redirects and holds the blob.

        The upstream repository must have proved it has the blob first, as
        for any blob served through it.
        """
        storage = self.cache.storage
        if storage is None or not storage.redirect:
            return None
        if not self.cache.blobs.allowed(origin, digest):
            await self._blob_head(route, origin, digest)
        location = await storage.location(digest)
        if location is None:
            return None
        self._count("blob", HIT)
        headers = _blob_headers(digest, HIT)
        headers.update({"Location": location, CACHE_TIER: SHARED, "Content-Length": "0"})
        return Reply(307, headers)

    async def _stored(
        self, route: Route, origin: str, digest: str, range_header: str | None
    ) -> Reply | None:
        """Stream a blob (or a range) the cache does not keep from the shared storage tier.

        The client's pace paces the read from the bucket.
        """
        storage = self.cache.storage
        size = self.cache.blobs.size_of(digest, origin)
        if storage is None or size is None:
            return None
        span = _parse_range(range_header, size)
        start, end = span or (0, size)
        response = await storage.open(digest, size, start, end)
        if response is None:
            return None
        self._count("blob", HIT)
        headers = _blob_headers(digest, HIT)
        headers.update({CACHE_TIER: SHARED, "Content-Length": str(end - start)})
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        stream = BodyStream(
            response,
            self._reactor,
            length=end - start,
            digest=None if span else digest,
            idle_timeout=self.upstreams.client(route).read_timeout,
            count=self._metrics.bytes_from_storage.inc,
        )
        stream.done.addBoth(_passing(lambda outcome: storage.release(digest, outcome)))
        return Reply(206 if span else 200, headers, stream=stream)

    def _parts(self, upstream: Upstream, size: int) -> int:
        """The connections to fetch a blob of *size* bytes over, in ranges; 1: one stream."""
        if size < upstream.parallel_min_size or not self.ranges.splits(upstream.name):
            return 1
        if self.cache.blobs.coordinator.resumes:  # in a cluster, fills are single streams
            return 1
        return upstream.parallel_parts

    async def _fill(self, fill: Fill, route: Route, origin: str) -> None:
        """Fetch a blob into the cache, for every reader of *fill*.

        The shared storage tier, if any, is asked first; then the cluster,
        whose other nodes may fill it or hold it; then the upstream.  A blob
        the upstream sends is stored in the storage tier too, once verified.
        """
        storage = self.cache.storage
        if storage is not None:
            stored = await storage.open(fill.digest, fill.size)
            if stored is not None:
                fill.finished.wait().addBoth(lambda result: storage.release(fill.digest, result))
                await self._fill_from_storage(fill, stored)
                return
        digest, size = fill.digest, fill.size
        path = f"blobs/{digest}"
        read_timeout = self.upstreams.client(route).read_timeout
        coordinator = self.cache.blobs.coordinator
        resume = partial(self._resume_fill, fill, route) if coordinator.resumes else None
        response = await coordinator.lead(digest, size, 0)
        if fill.done:  # abandoned meanwhile: the mirror is stopping
            return
        if response is not None:
            fill.count_as(self._metrics.bytes_from_nodes)
            await fill.start(response, read_timeout, resume)
            return
        ranged = None
        if isinstance(fill, RangedFill):
            client = self.upstreams.client(route)

            async def resolve(headers: dict[str, str]) -> IResponse:
                return await self._request(route, "GET", path, headers)

            ranged = RangedFetch(fill, client, resolve, self.ranges, self._metrics, self._reactor)
        try:
            headers = ranged.first_headers() if ranged is not None else None
            response = await self._request(route, "GET", path, headers)
        except RegistryError as e:
            fill.abandon(e)
            return
        if response.code != 200 and not (ranged and response.code == 206):
            fill.abandon(await self._failure(route, response, "BLOB_UNKNOWN", False))
            return
        length = _content_length(response)
        if response.code == 200 and length is not None and length != fill.size:
            discard(response)
            fill.abandon(StreamError(f"{length} bytes for {fill.digest}, {fill.size} expected"))
            return
        self.cache.blobs.allow(origin, fill.digest, length if response.code == 200 else fill.size)
        log.info(
            "filling {digest} ({size} bytes) from {upstream}{parts}",
            digest=fill.digest,
            size=fill.size,
            upstream=route.upstream.name,
            parts=f" in {len(fill.plan)} ranges" if isinstance(fill, RangedFill) else "",
        )
        if storage is not None:
            storage.upload(fill)
        if ranged is not None:
            await ranged.run(response)
        else:
            await fill.start(response, read_timeout, resume)

    async def _resume_fill(self, fill: Fill, route: Route, offset: int) -> IResponse:
        """The rest of a blob whose body broke at *offset*: from a node, or the upstream."""
        digest, size = fill.digest, fill.size
        response = await self.cache.blobs.coordinator.lead(digest, size, offset)
        if response is not None:
            fill.count_as(self._metrics.bytes_from_nodes)
            return response
        fill.count_as(self._metrics.bytes_from_upstream.labels(route.upstream.name))
        headers = {"Range": f"bytes={offset}-"} if offset else None
        response = await self._request(route, "GET", f"blobs/{digest}", headers)
        if response.code == 206 and content_range_start(response, size) == offset:
            return response
        if response.code == 200 and _content_length(response) in (None, size):
            return response
        discard(response)
        raise StreamError(f"the upstream answered {response.code} to the rest of {digest}")

    async def _fill_from_storage(self, fill: Fill, stored: IResponse) -> None:
        """Fill from the shared storage tier's whole-blob response, one stream."""
        fill.read_from_storage()
        log.info(
            "filling {digest} ({size} bytes) from the storage tier",
            digest=fill.digest,
            size=fill.size,
        )
        if not isinstance(fill, RangedFill):
            await fill.start(stored)
        elif await fill.open():
            body = PartBody(fill, 0, 0, fill.size, fill.size, self._reactor)
            body.done.addErrback(_abandon, fill)
            stored.deliverBody(body)
        else:
            discard(stored)

    def _blob_head(self, route: Route, origin: str, digest: str) -> Deferred[int | None]:
        """Ask the upstream repository for a blob: proof that it has it, and its size."""
        return self._flights.run(
            ("blob", origin, digest), lambda: self._ask_blob(route, origin, digest)
        )

    async def _ask_blob(self, route: Route, origin: str, digest: str) -> int | None:
        response = await self._request(route, "HEAD", f"blobs/{digest}")
        if response.code != 200:
            raise await self._failure(route, response, "BLOB_UNKNOWN", True)
        discard(response)
        content_type = (_header(response, "content-type") or "").lower()
        if content_type.startswith("text/html") or not _names(response, digest):
            # A portal or login page answering 200 to anything proves nothing.
            log.warn(
                "upstream {upstream} answered a HEAD of {digest} with a page"
                " ({content_type}) or another digest",
                upstream=route.upstream.name,
                digest=digest,
                content_type=content_type,
            )
            raise upstream_unavailable(route.upstream.name, "the answer is not the blob", 502)
        length = _content_length(response)
        self.cache.blobs.allow(origin, digest, length)
        return length

    def _admit(self, digest: str, size: int) -> str | None:
        """Apply ``max_layer_size``: None to cache, a reason to pass through, or refuse."""
        limit = self.cache.max_layer_size
        if limit is None or size <= limit:
            return None
        if self.cache.oversize == "reject":
            raise RegistryError(
                "DENIED",
                f"blob {digest} is {size} bytes, over this mirror's per-layer limit of"
                f" {limit} bytes (cache.max_layer_size)",
                {"digest": digest, "size": size, "limit": limit},
            )
        return "over max_layer_size"

    async def _passthrough(
        self, route: Route, origin: str, digest: str, head: bool, range_header: str | None
    ) -> Reply:
        """Stream a blob from the upstream without caching it.

        Only a single range is asked for: several would come back as
        ``multipart/byteranges``, so those are ignored, as for a cached blob.
        """
        headers = {"Range": range_header} if range_header and _range_spec(range_header) else None
        response = await self._request(route, "HEAD" if head else "GET", f"blobs/{digest}", headers)
        if response.code not in (200, 206):
            raise await self._failure(route, response, "BLOB_UNKNOWN", head)
        self._count("blob", MISS)
        length = _content_length(response)
        declared = self.cache.blobs.size_of(digest, origin)
        if response.code == 200 and declared is not None:
            # Bytes beyond the size the upstream announced to a HEAD are never sent.
            if length is not None and length != declared:
                discard(response)
                self.cache.blobs.doubt(digest, origin)
                raise upstream_unavailable(
                    route.upstream.name, f"{length} bytes for {digest}, {declared} expected", 502
                )
            length = declared
        reply_headers = _blob_headers(digest, MISS)
        if length is not None:
            reply_headers["Content-Length"] = str(length)
        content_range = _header(response, "content-range")
        if response.code == 206 and content_range:
            reply_headers["Content-Range"] = content_range
        if head:
            discard(response)
            return Reply(response.code, reply_headers)
        stream = BodyStream(
            response,
            self._reactor,
            length=length,
            digest=digest if response.code == 200 else None,
            idle_timeout=self.upstreams.client(route).read_timeout,
            count=self._metrics.bytes_from_upstream.labels(route.upstream.name).inc,
        )
        return Reply(response.code, reply_headers, stream=stream)

    # --- prefetch --------------------------------------------------------------------

    async def prefetch(
        self, route: Route, reference: str, platforms: Collection[str] = (), refresh: bool = False
    ) -> dict[str, Any]:
        """Fill the cache with an image: its manifests, its platforms, and their blobs.

        *platforms* limits a multi-platform image to those (all without);
        *refresh* asks the upstream what a tag is now, however fresh the cache.
        """
        summary: dict[str, Any] = {
            "digest": None,
            "manifests": 0,
            "blobs": 0,
            "fetched_bytes": 0,
            "already_cached": 0,
            "not_cached": [],
            "errors": [],
        }
        if refresh and not is_digest(reference):
            reply = await self.refresh_tag(route, reference)
        else:
            reply = await self.manifest(route, reference, None, head=False)
        summary["digest"] = reply.headers.get("Docker-Content-Digest")
        if reply.headers["X-Cache"] == STALE:
            summary["errors"].append(f"{reference}: the upstream could not be asked")
        await self._prefetch_manifest(route, reply, summary, platforms)
        return summary

    async def _prefetch_manifest(
        self, route: Route, reply: Reply, summary: dict[str, Any], platforms: Collection[str]
    ) -> None:
        summary["manifests"] += 1
        if reply.headers["Content-Type"] in INDEX_TYPES:
            for child, _ in references(reply.body, platforms):
                child_reply = await self.manifest(route, child, None, head=False)
                await self._prefetch_manifest(route, child_reply, summary, platforms)
            return
        refs = references(reply.body)
        semaphore = DeferredSemaphore(PREFETCH_PARALLEL)
        await DeferredList(
            [
                semaphore.run(
                    lambda d: Deferred.fromCoroutine(self._prefetch_blob(route, d, summary)),
                    digest,
                )
                for digest, _ in refs
            ]
        )

    async def _prefetch_blob(self, route: Route, digest: str, summary: dict[str, Any]) -> None:
        summary["blobs"] += 1
        try:
            source = await self._source(route, origin_of(route), digest)
            if source.passthrough is not None:
                summary["not_cached"].append(f"{digest}: {source.passthrough}")
            elif source.fill is None:
                summary["already_cached"] += 1
            else:
                await source.fill.finished.wait()
                summary["fetched_bytes"] += source.fill.size
        except (RegistryError, StreamError) as e:
            summary["errors"].append(f"{digest}: {e}")

    async def tags(self, route: Route, n: str | None, last: str | None) -> Reply:
        """List tags with ``n``/``last`` pagination.

        Upstreams that ignore ``n`` (distribution 2.8 among them) return every
        tag; those lists are sorted and paginated here.
        """
        limit = _page_size(n)
        if last and not TAG_RE.fullmatch(last):
            raise RegistryError("TAG_INVALID", "last must be a tag", {"last": last[:200]})
        params = [(k, v) for k, v in (("n", n), ("last", last)) if v is not None]
        response = await self._request(route, "GET", "tags/list", params=params)
        if response.code != 200:
            raise await self._failure(route, response, "NAME_UNKNOWN", False)
        body = await self._read(route, response)
        try:
            tags = json.loads(body)["tags"] or []
            if not all(isinstance(t, str) for t in tags):
                raise TypeError
        except (ValueError, KeyError, TypeError) as e:
            raise upstream_unavailable(route.upstream.name, "invalid tag list", 502) from e
        headers = {"Content-Type": "application/json"}
        link = _header(response, "link")
        if link:
            headers["Link"] = _tags_link(route, _link_query(link))
        else:
            tags = sorted(tags)
            if last is not None:
                tags = [t for t in tags if t > last]
            if limit is not None and len(tags) > limit:
                tags = tags[:limit]
                if tags:
                    headers["Link"] = _tags_link(route, [("n", str(limit)), ("last", tags[-1])])
        body = json.dumps({"name": route.client_name, "tags": tags}).encode()
        return Reply(200, headers, body)

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
            upstream_code = _first_error_code(body)
            if STATUS.get(upstream_code or "") != 404:
                upstream_code = unknown
            return RegistryError(
                upstream_code or unknown,
                f"not found at upstream {name}",
                {"repository": route.repository},
            )
        wait = str(retry_after(_header(response, "retry-after"), self._reactor.seconds()))
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


class Prefetcher:
    """Warms the cache for an image named as a client would (for the operator shell)."""

    def __init__(self, router: Router, pull: PullService) -> None:
        self.router = router
        self.pull = pull

    def __repr__(self) -> str:
        return f"<Prefetcher via {self.pull!r}>"

    async def prefetch(self, image_reference: str) -> dict[str, Any]:
        image = parse_image_reference(image_reference)
        route = self.router.route(image.name)
        summary = await self.pull.prefetch(route, image.reference)
        return {"image": image_reference, "upstream": route.key, **summary}


def _upstream_failed(route: Route, error: UpstreamError) -> RegistryError:
    """Log why an upstream failed a request; the error its client gets."""
    log.warn(
        "upstream {upstream} failed for {repository}: {error}",
        upstream=route.upstream.name,
        repository=route.repository,
        error=str(error),
    )
    return upstream_unavailable(route.upstream.name, str(error), error.status)


#: Pages of a referrers list followed at most.
REFERRERS_PAGES = 16


def _next_page(route: Route, digest: str, link: str | None) -> list[tuple[str, str]] | None:
    """The query of the next page of referrers an upstream's ``Link`` names, if any.

    Only a link to the same list on the same upstream is followed; its query
    is passed on as it is, bounded.
    """
    if link is None or 'rel="next"' not in link.replace(" ", ""):
        return None
    target = urlsplit(link.partition("<")[2].partition(">")[0])
    if target.netloc not in ("", urlsplit(route.base_url).netloc) or not target.path.endswith(
        f"/v2/{route.repository}/referrers/{digest}"
    ):
        log.warn(
            "upstream {upstream} links referrers to {target}: not followed",
            upstream=route.upstream.name,
            target=link[:200],
        )
        return None
    return [(k[:100], v[:1000]) for k, v in parse_qsl(target.query)[:10]]


def _transient(error: RegistryError) -> bool:
    """Whether an upstream error is one that serving a stale answer rides out."""
    return error.status == 429 or error.status >= 500


def _blob_headers(digest: str, x_cache: str) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "X-Cache": x_cache,
    }


#: A single byte range (RFC 9110): ``first-last``, ``first-`` or ``-suffix``;
#: positions of more than 20 digits (past any blob) are not parsed.
_RANGE_RE = re.compile(r"bytes=[ \t]*([0-9]{0,20})-([0-9]{0,20})[ \t]*", re.IGNORECASE)


def _range_spec(header: str | None) -> tuple[str, str] | None:
    """The first and last position of a single well-formed range; None to ignore *header*.

    Several ranges, a header that cannot be parsed, and a range whose last
    position is before its first are ignored (RFC 9110 14.2): the whole
    blob is served.
    """
    match = _RANGE_RE.fullmatch(header) if header else None
    if match is None:
        return None
    first, last = match.groups()
    if not (first or last) or (first and last and int(last) < int(first)):
        return None
    return first, last


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) of a single-range ``Range`` header; None serves the whole blob.

    A range that starts past the end is refused with a 416.
    """
    spec = _range_spec(header)
    if spec is None:
        return None
    first, last = spec
    if first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    else:
        start, end = max(size - int(last), 0), size
    if start >= end or start >= size:
        raise RegistryError(
            "RANGE_INVALID",
            "requested range not satisfiable",
            {"size": size},
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def _media_type(content_type: str | None) -> str:
    if not content_type:
        return MANIFEST_TYPES[0]
    return content_type.partition(";")[0].strip()


def _abandon(failure: Failure, fill: Fill) -> None:
    error = failure.value
    fill.abandon(error if isinstance(error, Exception) else StreamError(str(error)))


def _fill_crashed(failure: Failure, fill: Fill) -> None:
    log.failure("filling {digest} crashed", failure, digest=fill.digest)
    fill.abandon(StreamError(failure.getErrorMessage()))


def _passing(f: Callable[[Any], object]) -> Callable[[Any], Any]:
    """A callback that calls *f* with its input and passes the input on unchanged."""

    def callback(outcome: Any) -> Any:
        f(outcome)
        return outcome

    return callback


def _ignore(_: int) -> None:
    pass


def _first_error_code(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["errors"][0]["code"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


#: The largest page of tags a client may ask for with ``n``.
MAX_PAGE = 10_000


def _page_size(n: str | None) -> int | None:
    if n is None or n == "":
        return None
    if not (n.isascii() and n.isdigit()) or len(n) > 6 or int(n) > MAX_PAGE:
        raise RegistryError(
            "PAGINATION_NUMBER_INVALID",
            f"n must be an integer from 0 to {MAX_PAGE}",
            {"n": n[:20]},
        )
    return int(n)


def _link_query(link: str) -> list[tuple[str, str]]:
    """The ``n``/``last`` query of an upstream's pagination ``Link``."""
    target = link.partition("<")[2].partition(">")[0]
    return [(k, v) for k, v in parse_qsl(urlsplit(target).query) if k in ("n", "last")]


def _tags_link(route: Route, query: list[tuple[str, str]]) -> str:
    """The next page's ``Link``: on this mirror, to the upstream that served this page."""
    if route.ns is not None:
        query = [*query, ("ns", route.ns)]
    return f'</v2/{route.client_name}/tags/list?{urlencode(query)}>; rel="next"'
