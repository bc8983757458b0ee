"""The challenge-driven HTTP client that talks to one upstream registry.

A request is sent with whatever authorization the registry asked for last
time; a 401 is answered by parsing ``WWW-Authenticate``, fetching a Bearer token
from the realm (or using Basic credentials) and sending the request once more.
Tokens are cached per realm, service and scope until shortly before they expire.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from hyperlink import EncodedURL
from twisted.internet import defer
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from dockmirror import jsontext
from dockmirror.config import CONNECT_TIMEOUT, READ_TIMEOUT
from dockmirror.egress import DisallowedAddress, tls_failure
from dockmirror.hostnames import parse_host_header
from dockmirror.logs import printable
from dockmirror.metrics import Metrics
from dockmirror.proxy import ProxyError
from dockmirror.streaming import IdleTimer

log = Logger()

#: The most of an error or token body read into memory.
SMALL_BODY_LIMIT = 1 << 20
#: A token is dropped this many seconds before the upstream says it expires.
TOKEN_MARGIN = 10.0
#: The lifetime of a token whose service gives none or an unusable one, and the longest
#: a token is kept, whatever its service says.
TOKEN_LIFETIME = 60.0
MAX_TOKEN_LIFETIME = 3600.0
#: Tokens kept per upstream: there is one per repository clients ask for.
MAX_TOKENS = 1000
#: Redirects followed for one request.
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


# --- WWW-Authenticate ------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-case, e.g. "bearer"
    params: dict[str, str] = field(default_factory=dict)


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*({_TOKEN}|{_QUOTED})\s*(?:,|$)")
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")
_TOKEN68_RE = re.compile(r"\s*[A-Za-z0-9._~+/-]+=*\s*(?:,|$)")


def parse_www_authenticate(values: list[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (RFC 7235), in order.

    One value may hold several challenges; parameters may come in any order
    and be tokens or quoted strings.
    """
    challenges: list[Challenge] = []
    for value in values:
        pos = 0
        while pos < len(value):
            if value[pos] in ", \t":
                pos += 1
                continue
            m = _SCHEME_RE.match(value, pos)
            if not m:
                break
            scheme, pos = m.group(1).lower(), m.end()
            params: dict[str, str] = {}
            while True:
                p = _PARAM_RE.match(value, pos)
                if not p:
                    t = _TOKEN68_RE.match(value, pos) if not params else None
                    if t and not _PARAM_RE.match(value, pos):
                        pos = t.end()
                    break
                raw = p.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[p.group(1).lower()] = raw
                pos = p.end()
            challenges.append(Challenge(scheme, params))
    return challenges


# --- credentials -------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None] | None:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return parts.scheme, (parts.hostname or "").lower(), port


def may_send_credentials(realm: str, registry_url: str, token_realms: tuple[str, ...] = ()) -> bool:
    """Credentials go to the registry's own origin, or to a token service origin listed for it.

    An origin is a scheme, host and port, all three as configured: another
    port of the registry's host may be another party's service.  The list
    is the plugin's (Docker Hub's ``https://auth.docker.io``) and the
    operator's ``token_realms``.  No guess from domain names is made: tenants
    of a shared registry domain (``*.azurecr.io``) are different parties.
    """
    realm_origin = _origin(realm)
    if realm_origin is None or not realm_origin[1]:
        return False
    return realm_origin in {_origin(registry_url), *map(_origin, token_realms)}


def basic_authorization(username: str, password: str) -> str:
    pair = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


async def read_small(
    response: IResponse,
    limit: int = SMALL_BODY_LIMIT,
    *,
    reactor: IReactorTime | None = None,
    timeout: float | None = None,
) -> bytes:
    """Read a body expected to be small, whole.

    A body over *limit* bytes (declared or counted) or cut short raises
    :class:`UpstreamError`: a partial body is never taken for the whole one.
    With *reactor* and *timeout*, an upstream silent for *timeout* seconds
    has its connection aborted and :class:`UpstreamTimeout` is raised.
    """
    if response.length is not None and response.length != UNKNOWN_LENGTH:
        if response.length > limit:
            discard(response)
            raise UpstreamError(f"body of {response.length} bytes, over the {limit} allowed", 502)
    body = _SmallBody(limit, reactor, timeout)
    response.deliverBody(body)
    return await body.done


class _SmallBody(Protocol):
    """Collects a body up to a limit, under an idle timeout."""

    def __init__(self, limit: int, reactor: IReactorTime | None, timeout: float | None) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._timer = (
            IdleTimer(reactor, timeout, self._idle)
            if reactor is not None and timeout is not None
            else None
        )
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        if self._timer is not None:
            self._timer.start()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._timer is not None:
            self._timer.touch()
        self._size += len(data)
        if self._size > self._limit:
            self._end(UpstreamError(f"body over the {self._limit} bytes allowed", 502), abort=True)
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self._end(None)
        else:
            reasons = getattr(reason.value, "reasons", None) or [reason]
            why = printable("; ".join(f.getErrorMessage() for f in reasons))
            self._end(UpstreamError(f"body cut short: connection failed: {why}", 502))

    def _idle(self) -> None:
        assert self._timer is not None
        error = UpstreamTimeout(f"upstream sent nothing for {self._timer.timeout:.0f}s")
        self._end(error, abort=True)

    def _end(self, error: UpstreamError | None, abort: bool = False) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self.done.called:
            return
        if abort and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        if error is not None:
            self.done.errback(error)
        else:
            self.done.callback(b"".join(self._parts))


class _Discard:
    """A body protocol that drops the body, freeing the pooled connection."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def discard(response: IResponse) -> None:
    """Abort an unread response so its connection is not left busy."""
    response.deliverBody(_Discard())


# --- the client ----------------------------------------------------------------


class UpstreamError(Exception):
    """The upstream could not be reached (503), or answered unusably (502)."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class UpstreamTimeout(UpstreamError):
    """The upstream stayed silent for longer than its read timeout."""


class UpstreamClient:
    """Requests to one upstream registry base URL, with its authentication.

    Redirects are followed here, at most :data:`MAX_REDIRECTS`, to https
    only (http too when the base URL is http); ``Authorization`` is dropped
    at the first hop to another origin.  Where a connection may go is
    checked when it is made (:mod:`dockmirror.egress`).
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        http: Any,
        reactor: IReactorTime,
        metrics: Metrics,
        username: str | None = None,
        password: str | None = None,
        *,
        token_realms: tuple[str, ...] = (),
        trusted: str = "the system's CAs",
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        """*http* is a treq client whose connections time out after *connect_timeout*."""
        self.name = name
        self.connect_timeout = connect_timeout
        #: Seconds the upstream may stay silent before its headers or within a body.
        self.read_timeout = read_timeout
        self._metrics = metrics
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._reactor = reactor
        self._username = username
        self._password = password
        self._token_realms = token_realms
        self._trusted = trusted
        self._schemes = ("http", "https") if self.base_url.startswith("http:") else ("https",)
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}

    def __repr__(self) -> str:
        return f"<UpstreamClient {self.name} {self.base_url}>"

    async def request(
        self,
        method: str,
        repository: str,
        path: str,
        headers: dict[str, str] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> IResponse:
        """Send ``METHOD /v2/<repository>/<path>``; the body is left unread.

        The caller consumes the body, or discards it with :func:`discard`.
        """
        url = f"{self.base_url}/v2/{repository}/{path}"
        scope = f"repository:{repository}:pull"
        sent_with = await self._authorization(scope)
        response = await self._send(method, url, headers, params, sent_with)
        if response.code != 401:
            return response
        challenges = parse_www_authenticate(
            [v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])]
        )
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            return response
        self._challenge = usable[0]
        authorization = await self._authorization(scope, refresh=True)
        if authorization is None or authorization == sent_with:
            return response
        discard(response)
        return await self._send(method, url, headers, params, authorization)

    async def get(self, url: str, headers: dict[str, str]) -> IResponse:
        """GET *url*, where an earlier answer of this upstream led (a blob's final location).

        *headers* are sent as they are: ``Authorization`` only if that answer's
        request carried it.  Redirects are followed as for :meth:`request`.
        """
        return await self._send("GET", url, headers, None, None)

    async def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None,
        params: list[tuple[str, str]] | None,
        authorization: str | None,
    ) -> IResponse:
        h = Headers()
        for k, v in (headers or {}).items():
            h.setRawHeaders(k, [v])
        if authorization:
            h.setRawHeaders("Authorization", [authorization])
        hops = 0
        while True:
            response = await self._send_once(method, url, h, params)
            location = response.headers.getRawHeaders("location")
            if response.code not in _REDIRECTS or not location:
                return response
            discard(response)
            if hops == MAX_REDIRECTS:
                self._metrics.upstream_errors.labels(self.name, "redirect").inc()
                raise UpstreamError(f"more than {MAX_REDIRECTS} redirects", 502)
            hops += 1
            target = self.check_url(urljoin(url, location[0].strip()), "redirect")
            if _origin(target) != _origin(url):
                h.removeHeader("Authorization")
            log.debug(
                "{upstream}: {url} redirects to {target}",
                upstream=self.name,
                url=printable(url),
                target=printable(target),
            )
            url, params = target, None

    def check_url(self, url: str, what: str) -> str:
        """*url* if an upstream may send the mirror there (scheme and host grammar only)."""
        parts = urlsplit(url)
        ok = (
            parts.scheme in self._schemes
            and "@" not in parts.netloc
            and parse_host_header(parts.netloc) is not None
            and not any(c <= " " or c == "\x7f" for c in url)
            and _sendable(url)
        )
        if not ok:
            self._metrics.upstream_errors.labels(self.name, "redirect").inc()
            where = f"{parts.scheme}://{parts.netloc}"[:200]
            raise UpstreamError(
                f"{what} to {where!r} refused: only {' or '.join(self._schemes)}"
                " URLs with a host name or address",
                502,
            )
        return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))

    async def _send_once(
        self, method: str, url: str, headers: Headers, params: list[tuple[str, str]] | None
    ) -> IResponse:
        d = self._http.request(
            method,
            url,
            headers=headers,
            params=params,
            unbuffered=True,
            allow_redirects=False,
        )
        # The connection is bounded by the egress's connect timeout; the answer by ours.
        waited = self.connect_timeout + self.read_timeout
        d.addTimeout(waited, self._reactor, onTimeoutCancel=_timed_out)
        started = self._reactor.seconds()
        try:
            response: IResponse = await d
        except defer.TimeoutError as e:
            self._metrics.upstream_errors.labels(self.name, "timeout").inc()
            raise UpstreamError(f"no response within {waited:.0f}s") from e
        except ProxyError as e:
            self._metrics.upstream_errors.labels(self.name, "proxy").inc()
            log.warn("{upstream}: {error}", upstream=self.name, error=str(e))
            raise UpstreamError(str(e), 502) from e
        except DisallowedAddress as e:
            self._metrics.upstream_errors.labels(self.name, "refused").inc()
            log.warn("{upstream}: {error}", upstream=self.name, error=str(e))
            raise UpstreamError(str(e), 502) from e
        except (
            ConnectError,
            ConnectingCancelledError,
            DNSLookupError,
            TimeoutError,
            ResponseFailed,
            ResponseNeverReceived,
            RequestTransmissionFailed,
        ) as e:
            tls = tls_failure(e)
            if tls is not None:
                self._metrics.upstream_errors.labels(self.name, "tls").inc()
                host = urlsplit(url).netloc
                log.error(
                    "{upstream}: TLS to {host} failed: {reason} (trusting {trusted})",
                    upstream=self.name,
                    host=host,
                    reason=tls,
                    trusted=self._trusted,
                )
                raise UpstreamError(
                    f"TLS to {host} failed: {tls} (trusting {self._trusted})", 502
                ) from e
            self._metrics.upstream_errors.labels(self.name, "unreachable").inc()
            raise UpstreamError(_describe(e)) from e
        self._metrics.upstream_latency.labels(self.name).observe(self._reactor.seconds() - started)
        remaining = response.headers.getRawHeaders("ratelimit-remaining")
        if remaining:
            try:
                value = float(remaining[0].partition(";")[0])
            except ValueError:
                pass
            else:
                self._metrics.upstream_ratelimit_remaining.labels(self.name).set(value)
        return response

    async def read(self, response: IResponse, limit: int = SMALL_BODY_LIMIT) -> bytes:
        """Read a small body under :attr:`read_timeout` (see :func:`read_small`)."""
        try:
            return await read_small(
                response, limit, reactor=self._reactor, timeout=self.read_timeout
            )
        except UpstreamTimeout:
            self._metrics.upstream_errors.labels(self.name, "timeout").inc()
            raise

    async def _authorization(self, scope: str, refresh: bool = False) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if self._username is None or self._password is None:
                return None
            return basic_authorization(self._username, self._password)
        realm = challenge.params.get("realm")
        if not realm:
            return None
        service = challenge.params.get("service", "")
        key = (realm, service, scope)
        cached = self._tokens.get(key)
        now = self._reactor.seconds()
        if cached and cached[1] > now and not refresh:
            return "Bearer " + cached[0]
        fetched = await self._fetch_token(realm, service, scope)
        if fetched is None:
            return None
        token, lifetime = fetched
        self._tokens.pop(key, None)
        self._tokens[key] = (token, now + max(lifetime - TOKEN_MARGIN, 1.0))
        self._expire_tokens(now)
        return "Bearer " + token

    def _expire_tokens(self, now: float) -> None:
        """Drop expired tokens, then the oldest beyond :data:`MAX_TOKENS`."""
        for key in [k for k, (_, expiry) in self._tokens.items() if expiry <= now]:
            del self._tokens[key]
        while len(self._tokens) > MAX_TOKENS:
            del self._tokens[next(iter(self._tokens))]

    async def _fetch_token(self, realm: str, service: str, scope: str) -> tuple[str, float] | None:
        """A token and its lifetime; None when the token service refuses the credentials.

        A refusal leaves the registry's own 401 as the answer: an access
        error, where an upstream error would let expired tags be served stale.
        """
        params = [("scope", scope)]
        if service:
            params.insert(0, ("service", service))
        realm = self.check_url(realm, "token realm")
        shown = printable(realm)
        headers: dict[str, str] = {}
        if self._username is not None and self._password is not None:
            if may_send_credentials(realm, self.base_url, self._token_realms):
                headers["Authorization"] = basic_authorization(self._username, self._password)
                params.append(("account", self._username))
            else:
                log.warn(
                    "not sending {upstream} credentials to token realm {realm}: not the"
                    " registry's origin nor one of its token_realms (add it to token_realms"
                    " if it is the registry's token service)",
                    upstream=self.name,
                    realm=shown,
                )
        response = await self._send("GET", realm, headers, params, None)
        body = await self.read(response)
        if response.code in (401, 403):
            log.warn(
                "token service {realm} refused {upstream}: {code}",
                realm=shown,
                upstream=self.name,
                code=response.code,
            )
            return None
        if response.code != 200:
            raise UpstreamError(f"token service {shown} answered {response.code}")
        try:
            data = jsontext.loads(body)
            token = data.get("token") or data.get("access_token")
            expires_in = data.get("expires_in")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"token service {shown} answered without a token")
        log.debug("token for {scope} from {realm}", scope=printable(scope), realm=shown)
        return token, _lifetime(expires_in)


def _lifetime(expires_in: Any) -> float:
    """A token's ``expires_in``, at most :data:`MAX_TOKEN_LIFETIME`; the default if unusable."""
    try:
        seconds = float(expires_in or TOKEN_LIFETIME)
    except (ValueError, TypeError, OverflowError):
        return TOKEN_LIFETIME
    return min(seconds, MAX_TOKEN_LIFETIME) if math.isfinite(seconds) else TOKEN_LIFETIME


def _sendable(url: str) -> bool:
    """Whether treq can send a request to *url*: it cannot encode an IPv6 literal host."""
    try:
        EncodedURL.from_text(url).to_uri()
    except ValueError:  # idna's errors are ValueErrors
        return False
    return True


def _timed_out(result: object, timeout: float) -> Failure:
    """What a request cancelled by its timeout fails with, however the agent reported it."""
    return Failure(defer.TimeoutError(f"no response within {timeout:.0f}s"))


def _describe(e: Exception) -> str:
    """Why a request failed, short: the HTTP parser's errors quote what the upstream sent."""
    if isinstance(e, (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)):
        return "connection failed: " + printable("; ".join(f.getErrorMessage() for f in e.reasons))
    return printable(str(e) or type(e).__name__)
