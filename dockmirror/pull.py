"""The pull side of the registry API, answered from the upstreams.

Each method returns a :class:`Reply` for the web layer to send; a blob body is
a :class:`~dockmirror.streaming.BodyStream` that the web layer points at the
client's request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from dockmirror.errors import STATUS, RegistryError, upstream_unavailable
from dockmirror.metrics import Metrics
from dockmirror.reference import HEX_LENGTH, is_digest
from dockmirror.routing import Route
from dockmirror.streaming import BodyStream
from dockmirror.upstream import UpstreamClient, UpstreamError, discard, read_small

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
    stream: BodyStream | None = None


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


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


class Upstreams:
    """One :class:`UpstreamClient` per upstream and base URL, sharing a pool."""

    def __init__(self, http: Any, reactor: IReactorTime, metrics: Metrics) -> None:
        self._http = http
        self._reactor = reactor
        self._metrics = metrics
        self._clients: dict[tuple[str, str], UpstreamClient] = {}

    def client(self, route: Route) -> UpstreamClient:
        key = (route.upstream.name, route.base_url)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = UpstreamClient(
                route.upstream.name,
                route.base_url,
                self._http,
                self._reactor,
                self._metrics,
                route.upstream.username,
                route.upstream.password,
            )
        return client


class PullService:
    def __init__(self, upstreams: Upstreams, reactor: IReactorTime, metrics: Metrics) -> None:
        self.upstreams = upstreams
        self._reactor = reactor
        self._metrics = metrics

    async def _request(
        self,
        route: Route,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> IResponse:
        client = self.upstreams.client(route)
        try:
            return await client.request(method, route.repository, path, headers, params)
        except UpstreamError as e:
            log.warn(
                "upstream {upstream} unreachable for {repository}: {error}",
                upstream=route.upstream.name,
                repository=route.repository,
                error=str(e),
            )
            raise upstream_unavailable(route.upstream.name, str(e)) from e

    async def manifest(self, route: Route, reference: str, accept: str | None, head: bool) -> Reply:
        response = await self._request(
            route,
            "HEAD" if head else "GET",
            f"manifests/{reference}",
            {"Accept": negotiable(accept)},
        )
        if response.code != 200:
            raise await self._failure(route, response, "MANIFEST_UNKNOWN", head)
        content_type = _header(response, "content-type") or MANIFEST_TYPES[0]
        digest = _header(response, "docker-content-digest")
        if head:
            discard(response)
            headers = {"Content-Type": content_type}
            if digest:
                headers["Docker-Content-Digest"] = digest
            length = _content_length(response)
            if length is not None:
                headers["Content-Length"] = str(length)
            return Reply(200, headers)
        body = await read_small(response, MANIFEST_LIMIT)
        if len(body) >= MANIFEST_LIMIT:
            raise upstream_unavailable(route.upstream.name, "manifest too large", 502)
        expected = reference if is_digest(reference) else digest
        algorithm = expected.partition(":")[0] if expected else "sha256"
        actual = compute_digest(body, algorithm if algorithm in HEX_LENGTH else "sha256")
        if expected and actual != expected:
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
        return Reply(
            200,
            {
                "Content-Type": content_type,
                "Docker-Content-Digest": expected or actual,
                "ETag": f'"{expected or actual}"',
            },
            body,
        )

    async def blob(self, route: Route, digest: str, head: bool, range_header: str | None) -> Reply:
        headers = {"Range": range_header} if range_header else None
        response = await self._request(route, "HEAD" if head else "GET", f"blobs/{digest}", headers)
        if response.code not in (200, 206):
            raise await self._failure(route, response, "BLOB_UNKNOWN", head)
        length = _content_length(response)
        reply_headers = {
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": digest,
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
        }
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
        )
        return Reply(response.code, reply_headers, stream=stream)

    async def tags(self, route: Route, n: str | None, last: str | None) -> Reply:
        """List tags with ``n``/``last`` pagination.

        Upstreams that ignore ``n`` (distribution 2.8 among them) return every
        tag; those lists are sorted and paginated here.
        """
        limit = _page_size(n)
        params = [(k, v) for k, v in (("n", n), ("last", last)) if v is not None]
        response = await self._request(route, "GET", "tags/list", params=params)
        if response.code != 200:
            raise await self._failure(route, response, "NAME_UNKNOWN", False)
        body = await read_small(response)
        try:
            tags = json.loads(body)["tags"] or []
            if not all(isinstance(t, str) for t in tags):
                raise TypeError
        except (ValueError, KeyError, TypeError) as e:
            raise upstream_unavailable(route.upstream.name, "invalid tag list", 502) from e
        headers = {"Content-Type": "application/json"}
        link = _header(response, "link")
        if link:
            headers["Link"] = _tags_link(route.client_name, _link_query(link))
        else:
            tags = sorted(tags)
            if last is not None:
                tags = [t for t in tags if t > last]
            if limit is not None and len(tags) > limit:
                tags = tags[:limit]
                if tags:
                    query = urlencode([("n", str(limit)), ("last", tags[-1])])
                    headers["Link"] = _tags_link(route.client_name, query)
        body = json.dumps({"name": route.client_name, "tags": tags}).encode()
        return Reply(200, headers, body)

    async def _failure(
        self, route: Route, response: IResponse, unknown: str, head: bool
    ) -> RegistryError:
        """The error a client gets for an upstream's non-success answer."""
        body = b"" if head else await read_small(response)
        if head:
            discard(response)
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
        if code == 429:
            return RegistryError(
                "TOOMANYREQUESTS",
                f"upstream {name} is rate-limiting this mirror; try again later",
                {"upstream": name},
                headers={"Retry-After": _header(response, "retry-after") or "60"},
            )
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


def _first_error_code(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["errors"][0]["code"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _page_size(n: str | None) -> int | None:
    if n is None or n == "":
        return None
    if not n.isdigit():
        raise RegistryError(
            "PAGINATION_NUMBER_INVALID", "n must be a non-negative integer", {"n": n[:20]}
        )
    return int(n)


def _link_query(link: str) -> str:
    """The ``n``/``last`` query of an upstream's pagination ``Link``."""
    target = link.partition("<")[2].partition(">")[0]
    return urlencode([(k, v) for k, v in parse_qsl(urlsplit(target).query) if k in ("n", "last")])


def _tags_link(client_name: str, query: str) -> str:
    return f'</v2/{client_name}/tags/list?{query}>; rel="next"'
