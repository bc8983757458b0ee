"""The HTTP resource tree: ``/v2/`` and its error responses."""

from __future__ import annotations

import io
import json
import time
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_plus

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from dockmirror.auth.access import AccessControl, Credentials, Principal, parse_authorization
from dockmirror.config import (
    HEADER_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_CLIENT,
    SEND_TIMEOUT,
)
from dockmirror.connections import ConnectionLimits, GuardedChannel, Refused
from dockmirror.errors import RegistryError
from dockmirror.forwarded import ClientAddresses
from dockmirror.metrics import Metrics
from dockmirror.pull import PullService, Reply
from dockmirror.reference import check_media_type, parse_v2_path
from dockmirror.routing import Router
from dockmirror.streaming import StreamError

log = Logger()
access_log = Logger(namespace="dockmirror.access")

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")


def _arg(request: Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _header(request: Request, name: bytes) -> str | None:
    """A request header's last value as text.

    Octets outside ASCII are read as Latin-1 (RFC 9110 5.5), so a client's
    stray byte never fails a request; no grammar here accepts them.
    """
    values = request.requestHeaders.getRawHeaders(name)
    return values[-1].decode("latin-1") if values else None


def _query_value(request: Request, name: str) -> str | None:
    """A query parameter as RFC 3986 has it: a ``+`` stays a ``+`` (as in media types)."""
    query = request.uri.partition(b"?")[2].decode("ascii", "replace")
    for pair in query.split("&")[:MAX_FIELDS]:
        key, _, value = pair.partition("=")
        if unquote(key) == name and value:
            return unquote(value, errors="replace")
    return None


#: Query parameters whose values never reach the log.
SECRET_PARAMETERS = frozenset(
    {"password", "refresh_token", "client_secret", "access_token", "token", "api_key", "apikey"}
)


def loggable_uri(uri: bytes) -> str:
    """*uri* for the log, with the values of credential-bearing parameters as ``***``."""
    path, question, query = uri.decode("ascii", "replace").partition("?")
    pairs = []
    for pair in query.split("&") if question else ():
        name, eq, _ = pair.partition("=")
        if eq and unquote_plus(name).strip().lower() in SECRET_PARAMETERS:
            pair = f"{name}=***"
        pairs.append(pair)
    return (path + question + "&".join(pairs))[:500]


def _range(request: Request, digest: str) -> str | None:
    """The ``Range`` to honour: none when ``If-Range`` names other than the blob's ETag.

    A date in ``If-Range`` never matches: blob replies carry no Last-Modified.
    """
    if_range = _header(request, b"if-range")
    if if_range is not None and if_range.strip() != f'"{digest}"':
        return None
    return _header(request, b"range")


def write_error(request: Request, error: RegistryError) -> None:
    """Answer *request* with a registry-format error, or cut it if headers went out."""
    if request.startedWriting:
        request.loseConnection()
        return
    headers = {**error.headers, "Content-Type": "application/json"}
    send_body(request, Reply(error.status, headers, error.body()))


class AsyncResource(Resource):
    """A leaf resource whose requests are served by a coroutine.

    The coroutine is cancelled when the client goes away, and every
    exception becomes a registry-format error rather than a traceback.
    """

    isLeaf = True

    def render(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self.serve(request))
        gone = request.notifyFinish()
        gone.addErrback(lambda _: d.cancel())
        d.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    async def serve(self, request: Request) -> None:
        raise NotImplementedError

    @staticmethod
    def _failed(failure: Any, request: Request, gone: Deferred[None]) -> None:
        if gone.called:
            failure.trap(CancelledError, StreamError)
            return
        if failure.check(RegistryError):
            write_error(request, failure.value)
        elif failure.check(StreamError):
            log.warn(
                "stream to {client} cut: {error}",
                client=request.getClientAddress(),
                error=failure.getErrorMessage(),
            )
            request.loseConnection()
        else:
            log.failure("unexpected error serving {uri}", failure, uri=loggable_uri(request.uri))
            write_error(request, RegistryError("UNKNOWN", "internal error", status=500))


def _start(request: Request, reply: Reply) -> None:
    request.setResponseCode(reply.status)
    for name, value in reply.headers.items():
        request.setHeader(name, value)


def send_body(request: Request, reply: Reply) -> None:
    """Send a reply whose body is in memory (a HEAD gets its headers only)."""
    _start(request, reply)
    if reply.body:
        request.setHeader("Content-Length", str(len(reply.body)))
        request.write(reply.body)
    request.finish()


async def send_reply(request: Request, reply: Reply) -> None:
    if reply.stream is None:
        send_body(request, reply)
        return
    _start(request, reply)
    await reply.stream.write_to(request)
    request.finish()


#: Route label values of ``dockmirror_http_requests_total``; anything else is ``other``.
ROUTES = (
    "base",
    "manifest",
    "blob",
    "referrers",
    "tags",
    "token",
    "metrics",
    "healthz",
    "other",
)
#: Method label values; any other method is counted as ``other``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TOP_ROUTES = {
    (b"docker-auth", b"token"): "token",
    (b"metrics",): "metrics",
    (b"healthz",): "healthz",
}


def route_label(path: bytes) -> str:
    """What a request path is about, as one of :data:`ROUTES`; the client picks none of it."""
    parts = path.split(b"?", 1)[0].rstrip(b"/").split(b"/")[1:]
    if parts[:1] != [b"v2"]:
        return _TOP_ROUTES.get(tuple(parts), "other")
    if len(parts) == 1:
        return "base"
    if len(parts) >= 4 and parts[-2] == b"manifests":
        return "manifest"
    if len(parts) >= 4 and parts[-2] == b"blobs":
        return "blob"
    if len(parts) >= 4 and parts[-2] == b"referrers":
        return "referrers"
    if len(parts) >= 4 and parts[-2:] == [b"tags", b"list"]:
        return "tags"
    return "other"


def method_label(method: bytes) -> str:
    """The request method as one of :data:`METHODS`, or ``other``."""
    name = method.decode("latin-1")
    return name if name in METHODS else "other"


#: The largest request body read: only the token endpoint's POST form has one.
MAX_BODY = 64 * 1024


class MirrorRequest(Request):
    """A request that remembers what the access log needs, and refuses large bodies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = time.monotonic()
        self.upstream: str | None = None
        self.key_id: str | None = None
        self._body_size = 0
        self._refused = False
        self._client: IAddress | None = None

    def getClientAddress(self) -> IAddress:
        """The client's address: a trusted proxy's peer is replaced by whom it forwards."""
        if self._client is None:
            peer = super().getClientAddress()
            site = getattr(self, "site", None)
            host = getattr(peer, "host", None)
            if not isinstance(site, MirrorSite) or not isinstance(host, str):
                return peer
            client = site.clients.client(host, self.requestHeaders)
            if client == host:
                self._client = peer
            else:
                kind = IPv6Address if ":" in client else IPv4Address
                self._client = kind("TCP", client, 0)
        return self._client

    def gotLength(self, length: int | None) -> None:
        # Twisted spools a body of unknown or large length to a file in /tmp;
        # this one is held to MAX_BODY, in memory.
        self.content = io.BytesIO()
        if length is not None and length > MAX_BODY:
            self._refuse_body()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_size += len(data)
        if self._body_size > MAX_BODY:
            self._refuse_body()
        else:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse_body(self) -> None:
        """Answer 413 without reading the body, and close the connection."""
        self._refused = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        body = RegistryError(
            "SIZE_INVALID", f"request bodies are limited to {MAX_BODY} bytes", status=413
        ).body()
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        site = getattr(self, "site", None)
        if not self.finished and isinstance(site, MirrorSite):
            site.record(self, "aborted")
        super().connectionLost(reason)


#: Headers a request may carry once (RFC 9112 3.2 for Host): servers that read
#: different ones of two (a proxy in front takes the first, Twisted the last)
#: would route or authorize the request differently.
SINGLE_HEADERS = (b"host", b"authorization")


def _refusal(status: int, reason: bytes, error: RegistryError) -> bytes:
    """A whole registry-format error response that closes the connection."""
    body = error.body()
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, reason, len(body), body)
    )


class MirrorChannel(GuardedChannel):
    """HTTP/1.1 whose refusals of malformed or oversized requests are registry errors.

    Twisted answers a request it cannot parse with a bare ``400`` and drops a
    header line over ``MAX_LENGTH`` without a word; clients get a JSON error
    that says which.
    """

    def headerReceived(self, line: bytes) -> bool:
        """Store a header; refuse a second one of :data:`SINGLE_HEADERS`."""
        if not super().headerReceived(line):
            return False
        headers = self.requests[-1].requestHeaders
        if any(len(headers.getRawHeaders(name, ())) > 1 for name in SINGLE_HEADERS):
            error = RegistryError(
                "UNSUPPORTED", "a request carries one Host and one Authorization header", status=400
            )
            self._refuse(_refusal(400, b"Bad Request", error))
            return False
        return True

    def lineLengthExceeded(self, line: bytes) -> None:
        error = RegistryError(
            "SIZE_INVALID",
            f"request line or header longer than {self.MAX_LENGTH} bytes",
            status=431,
        )
        self._refuse(_refusal(431, b"Request Header Fields Too Large", error))

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's one way out for a malformed request line, header or framing."""
        error = RegistryError(
            "UNSUPPORTED",
            "malformed HTTP request, or headers over "
            f"{self.totalHeadersSize} bytes or {self.maxHeaders} fields",
            status=400,
        )
        self._refuse(_refusal(400, b"Bad Request", error))

    def _refuse(self, response: bytes) -> None:
        if self.transport is not None:
            self.transport.write(response)
        self.loseConnection()


class MirrorSite(Site):
    """The site, with one structured log event and metric update per request.

    Its channels speak HTTP/1.1 only (see :meth:`acceptableProtocols`).
    """

    requestFactory = MirrorRequest
    noisy = False

    def __init__(
        self,
        resource: Resource,
        metrics: Metrics,
        clients: ClientAddresses | None = None,
        limits: ConnectionLimits | None = None,
        *,
        header_timeout: float = HEADER_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        """*limits* may be shared by the sites of several listeners."""
        super().__init__(resource, timeout=idle_timeout)
        self.displayTracebacks = False
        self.metrics = metrics
        self.clients = clients if clients is not None else ClientAddresses()
        self.limits = limits or ConnectionLimits(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT)
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout

    def protocol(self) -> MirrorChannel:  # type: ignore[override]
        """A channel per connection, HTTP/1.1 only: no h2 switch."""
        return MirrorChannel(self.limits, self.header_timeout, self.reactor, self.send_timeout)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        refusal = self.limits.refusal(addr)
        if refusal is not None:
            return Refused(refusal)
        return super().buildProtocol(addr)

    def acceptableProtocols(self) -> list[bytes]:
        """Only HTTP/1.1 over ALPN, even where the ``h2`` package is installed.

        Through Twisted, h2 served a fifth of HTTP/1.1's throughput and
        buffered a client's whole flow-control window per stream
        (bench/RESULTS.md, "HTTP/2 over TLS").
        """
        return [b"http/1.1"]

    def log(self, request: Any) -> None:
        self.record(request, str(request.code))

    def record(self, request: Request, status: str) -> None:
        method = request.method.decode("ascii", "replace")[:10]
        self.metrics.requests.labels(
            route_label(request.uri), method_label(request.method), status
        ).inc()
        x_cache = request.responseHeaders.getRawHeaders("x-cache", [None])[0]
        duration = time.monotonic() - getattr(request, "started", time.monotonic())
        access_log.info(
            "{client} {key} {method} {uri} {status} {bytes}B {duration:.3f}s"
            " upstream={upstream} cache={cache}",
            client=getattr(request.getClientAddress(), "host", "-"),
            key=getattr(request, "key_id", None) or "-",
            method=method,
            uri=loggable_uri(request.uri),
            status=status,
            bytes=request.sentLength,
            duration=duration,
            upstream=getattr(request, "upstream", None) or "-",
            cache=x_cache or "-",
            user_agent=(_header(request, b"user-agent") or "")[:200],
        )


def _client_host(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "-"))


def _count_usage(request: Request, access: AccessControl, principal: Principal) -> None:
    """Count the request towards its key once the response is over, sent bytes and all."""
    if principal.app_id is None:
        return
    request.key_id = principal.app_id  # type: ignore[attr-defined]  # for the access log
    request.notifyFinish().addBoth(lambda _: access.record(principal, request.sentLength))


class V2Resource(AsyncResource):
    """Everything under ``/v2/``: the pull side of the distribution API.

    With *access*, every request must be authorized by it first.
    """

    def __init__(
        self, router: Router, pull: PullService, access: AccessControl | None = None
    ) -> None:
        super().__init__()
        self.router = router
        self.pull = pull
        self.access = access

    def render(self, request: Request) -> Any:
        request.setHeader(*API_VERSION)
        return super().render(request)

    async def serve(self, request: Request) -> None:
        method = request.method
        if method not in (b"GET", b"HEAD"):
            raise RegistryError(
                "UNSUPPORTED",
                "this registry is a pull-through mirror: push and delete are not supported",
                {"method": method.decode("latin-1")[:20]},
            )
        try:
            segments = [s.decode("ascii") for s in request.postpath or []]
        except UnicodeDecodeError:
            raise RegistryError("NAME_INVALID", "invalid repository name") from None
        path = parse_v2_path(segments)
        head = method == b"HEAD"
        route = None
        if path.kind not in ("base", "catalog"):
            route = self.router.route(path.name, _header(request, b"host"), _arg(request, b"ns"))
            request.upstream = route.upstream.name  # type: ignore[attr-defined]
        if self.access is not None:
            principal = await self.access.authorize(
                _header(request, b"authorization"), _client_host(request), route
            )
            _count_usage(request, self.access, principal)
        if path.kind == "base":
            reply = Reply(200, {"Content-Type": "application/json"}, b"{}")
        elif route is None:
            raise RegistryError("UNSUPPORTED", "a mirror has no catalog")
        elif path.kind == "manifests":
            accept = ", ".join(
                v.decode("latin-1") for v in request.requestHeaders.getRawHeaders(b"accept", [])
            )
            reply = await self.pull.manifest(route, path.reference, accept or None, head)
        elif path.kind == "blobs":
            reply = await self.pull.blob(
                route, path.reference, head, _range(request, path.reference)
            )
        elif path.kind == "referrers":
            artifact_type = _query_value(request, "artifactType")
            if artifact_type is not None:
                check_media_type(artifact_type)
            reply = await self.pull.referrers(route, path.reference, artifact_type, head)
        else:
            reply = await self.pull.tags(route, _arg(request, b"n"), _arg(request, b"last"))
        await send_reply(request, reply)


class TokenResource(AsyncResource):
    """``/docker-auth/token``: bearer tokens for API keys, per the distribution token spec.

    ``GET`` takes the key as Basic credentials with ``service`` and ``scope``
    parameters (``offline_token`` and ``account`` are accepted and ignored: no
    refresh tokens are issued, the apiKey is the long-lived credential).
    ``POST`` takes the OAuth2 password grant form that containerd sends, from
    the request body only: a query string ends up in logs along the way.
    """

    def __init__(self, access: AccessControl) -> None:
        super().__init__()
        self.access = access

    async def serve(self, request: Request) -> None:
        if request.method == b"GET":
            params = _parameters(request.uri.partition(b"?")[2])
            credentials = parse_authorization(_header(request, b"authorization"))
            if credentials is not None and credentials.scheme != "basic":
                credentials = None
        elif request.method == b"POST":
            params = _form(request)
            grant = _first(params, "grant_type")
            if grant != "password":
                raise RegistryError(
                    "UNSUPPORTED",
                    "only the password grant is supported, in a form body",
                    {"grant_type": (grant or "")[:40]},
                    status=400,
                )
            credentials = Credentials(
                "basic", _first(params, "username") or "", _first(params, "password") or ""
            )
        else:
            raise RegistryError(
                "UNSUPPORTED", "use GET or POST", status=405, headers={"Allow": "GET, POST"}
            )
        principal, body = await self.access.issue(
            credentials, _client_host(request), _first(params, "service"), params.get("scope", [])
        )
        _count_usage(request, self.access, principal)
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        send_body(request, Reply(200, headers, json.dumps(body).encode()))


#: Form or query fields read at most.
MAX_FIELDS = 100


def _parameters(encoded: bytes) -> dict[str, list[str]]:
    """URL-encoded ``name=value`` pairs; a malformed or oversized set is a 400."""
    try:
        return parse_qs(
            encoded.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise RegistryError("UNSUPPORTED", "malformed form or query", status=400) from None


def _form(request: Request) -> dict[str, list[str]]:
    """The fields of an ``application/x-www-form-urlencoded`` request body."""
    kind = (_header(request, b"content-type") or "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded" or request.content is None:
        return {}
    request.content.seek(0)
    return _parameters(request.content.read())


def _first(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


class RootResource(Resource):
    """The site root: registry-format 404s for anything unknown."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> Any:
        write_error(request, RegistryError("NAME_UNKNOWN", "not found", status=404))
        return NOT_DONE_YET


def build_root(
    router: Router, pull: PullService, access: AccessControl | None = None, required: bool = False
) -> Resource:
    """The resource tree; with *access*, the token service, and checks on /v2 if *required*."""
    root = RootResource()
    root.putChild(b"v2", V2Resource(router, pull, access if required else None))
    if access is not None:
        auth = RootResource()
        auth.putChild(b"token", TokenResource(access))
        root.putChild(b"docker-auth", auth)
    return root
