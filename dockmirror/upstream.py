"""The challenge-driven HTTP client that talks to one upstream registry.

A request is sent with whatever authorization the registry asked for last
time; a 401 is answered by parsing ``WWW-Authenticate``, fetching a Bearer token
from the realm (or using Basic credentials) and sending the request once more.
Tokens are cached per realm, service and scope until shortly before they expire.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

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
from twisted.web.iweb import IResponse

from dockmirror.config import CONNECT_TIMEOUT, READ_TIMEOUT
from dockmirror.metrics import Metrics
from dockmirror.streaming import IdleTimer

log = Logger()

#: The most of an error or token body read into memory.
SMALL_BODY_LIMIT = 1 << 20
#: A token is dropped this many seconds before the upstream says it expires.
TOKEN_MARGIN = 10.0


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


def registrable_domain(host: str) -> str:
    """The last two labels of a DNS name (the whole of an IP address or single label).

    This is the usual approximation of the registrable domain: it treats
    ``docker.io`` as the domain of ``auth.docker.io`` and ``registry-1.docker.io``.
    """
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        return ".".join(host.split(".")[-2:])


def may_send_credentials(realm: str, registry_url: str) -> bool:
    """Credentials go only to the registry's own host or its registrable domain."""
    realm_parts, registry_parts = urlsplit(realm), urlsplit(registry_url)
    realm_host = realm_parts.hostname or ""
    registry_host = registry_parts.hostname or ""
    if realm_parts.scheme == "http" and registry_parts.scheme == "https":
        return False
    return realm_host == registry_host or (
        registrable_domain(realm_host) == registrable_domain(registry_host)
        and "." in registrable_domain(realm_host)
    )


def basic_authorization(username: str, password: str) -> str:
    pair = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


class UpstreamError(Exception):
    """The upstream could not be reached, or stopped answering."""


class UpstreamTimeout(UpstreamError):
    """The upstream stayed silent for longer than its read timeout."""


async def read_small(
    response: IResponse,
    limit: int = SMALL_BODY_LIMIT,
    *,
    reactor: IReactorTime | None = None,
    timeout: float | None = None,
) -> bytes:
    """Read a body expected to be small; a larger one is cut off at *limit*.

    With *reactor* and *timeout*, an upstream silent for *timeout* seconds
    has its connection aborted and :class:`UpstreamError` is raised.
    """
    if response.length is not None and response.length != -1 and response.length > limit:
        response.deliverBody(_Discard())
        return b""
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
        keep = data[: self._limit - self._size]
        self._parts.append(keep)
        self._size += len(keep)
        if len(keep) < len(data):
            self._end(None, abort=True)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self._end(None)
        else:
            self._end(UpstreamError(f"connection failed: {reason.getErrorMessage()}"))

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


class UpstreamClient:
    """Requests to one upstream registry base URL, with its authentication."""

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
        d = self._http.request(method, url, headers=h, params=params, unbuffered=True)
        # The connection is bounded by the agent's connect timeout; the answer by ours.
        waited = self.connect_timeout + self.read_timeout
        d.addTimeout(waited, self._reactor, onTimeoutCancel=_timed_out)
        started = self._reactor.seconds()
        try:
            response: IResponse = await d
        except defer.TimeoutError as e:
            self._metrics.upstream_errors.labels(self.name, "timeout").inc()
            raise UpstreamError(f"no response within {waited:.0f}s") from e
        except (
            ConnectError,
            ConnectingCancelledError,
            DNSLookupError,
            TimeoutError,
            ResponseFailed,
            ResponseNeverReceived,
            RequestTransmissionFailed,
        ) as e:
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
        except UpstreamError as e:
            reason = "timeout" if isinstance(e, UpstreamTimeout) else "unreachable"
            self._metrics.upstream_errors.labels(self.name, reason).inc()
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
        self._tokens[key] = (token, now + max(lifetime - TOKEN_MARGIN, 1.0))
        self._expire_tokens(now)
        return "Bearer " + token

    def _expire_tokens(self, now: float) -> None:
        for key in [k for k, (_, expiry) in self._tokens.items() if expiry <= now]:
            del self._tokens[key]

    async def _fetch_token(self, realm: str, service: str, scope: str) -> tuple[str, float] | None:
        """A token and its lifetime; None when the token service refuses the credentials.

        A refusal leaves the registry's own 401 as the answer: an access
        error, where an upstream error would let expired tags be served stale.
        """
        params = [("scope", scope)]
        if service:
            params.insert(0, ("service", service))
        headers: dict[str, str] = {}
        if self._username is not None and self._password is not None:
            if may_send_credentials(realm, self.base_url):
                headers["Authorization"] = basic_authorization(self._username, self._password)
                params.append(("account", self._username))
            else:
                log.warn(
                    "not sending {upstream} credentials to token realm {realm} on another domain",
                    upstream=self.name,
                    realm=realm,
                )
        response = await self._send("GET", realm, headers, params, None)
        body = await self.read(response)
        if response.code in (401, 403):
            log.warn(
                "token service {realm} refused {upstream}: {code}",
                realm=realm,
                upstream=self.name,
                code=response.code,
            )
            return None
        if response.code != 200:
            raise UpstreamError(f"token service {realm} answered {response.code}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
            lifetime = float(data.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"token service {realm} answered without a token")
        log.debug("token for {scope} from {realm}", scope=scope, realm=realm)
        return token, lifetime


def _timed_out(result: object, timeout: float) -> Failure:
    """What a request cancelled by its timeout fails with, however the agent reported it."""
    return Failure(defer.TimeoutError(f"no response within {timeout:.0f}s"))


def _describe(e: Exception) -> str:
    if isinstance(e, (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)):
        return "connection failed: " + "; ".join(f.getErrorMessage() for f in e.reasons)
    return str(e) or type(e).__name__
