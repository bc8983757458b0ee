"""The challenge-driven upstream client, against in-memory registries."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web._newclient import ParseError, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Request

from dockmirror import config as config_module
from dockmirror import upstream
from dockmirror.egress import Egress, UpstreamTLS
from dockmirror.metrics import Metrics
from dockmirror.pull.upstreams import CLIENTS_LIMIT, Upstreams
from dockmirror.routing import build_router
from dockmirror.upstream import UpstreamClient, UpstreamError


class FakeRegistry(Resource):
    """A registry at https://registry-1.docker.io with a token realm on auth.docker.io."""

    isLeaf = True

    def __init__(self, realm: str = "https://auth.docker.io/token", lifetime: Any = 300) -> None:
        super().__init__()
        self.realm = realm
        self.lifetime = lifetime
        self.issued = 0
        self.token_requests: list[dict[str, Any]] = []
        self.registry_requests: list[str | None] = []

    def render(self, request: Request) -> bytes:
        host = request.getHeader("host")
        if request.path == b"/token":
            self.issued += 1
            self.token_requests.append(
                {
                    "host": host,
                    "args": {
                        k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()
                    },
                    "authorization": request.getHeader("authorization"),
                }
            )
            return json.dumps({"token": f"t{self.issued}", "expires_in": self.lifetime}).encode()
        auth = request.getHeader("authorization")
        self.registry_requests.append(auth)
        if auth != f"Bearer t{self.issued}" or self.issued == 0:
            request.setResponseCode(401)
            scope = "repository:" + request.path.decode().split("/v2/")[1].rsplit("/", 2)[0]
            request.setHeader(
                "WWW-Authenticate",
                f'Bearer realm="{self.realm}",service="registry.docker.io",scope="{scope}:pull"',
            )
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"x","detail":null}]}'
        return b"manifest"


def make_client(
    resource: Resource, username: str | None = None, password: str | None = None
) -> tuple[UpstreamClient, StubTreq, MemoryReactorClock]:
    stub = StubTreq(resource)
    clock = MemoryReactorClock()
    client = UpstreamClient(
        "hub",
        "https://registry-1.docker.io",
        stub,
        clock,
        Metrics(),
        username,
        password,
        token_realms=("https://auth.docker.io",),
    )
    return client, stub, clock


def fetch(
    client: UpstreamClient, stub: StubTreq, repository: str = "library/nginx"
) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        response = await client.request("GET", repository, "manifests/latest")
        body: bytes = await response.content()
        return response.code, body

    results: list[Any] = []
    Deferred.fromCoroutine(go()).addBoth(results.append)
    stub.flush()
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def test_bearer_challenge_then_cached_token() -> None:
    registry = FakeRegistry()
    client, stub, clock = make_client(registry)
    assert fetch(client, stub) == (200, b"manifest")
    assert registry.issued == 1
    assert registry.token_requests[0]["args"] == {
        "service": ["registry.docker.io"],
        "scope": ["repository:library/nginx:pull"],
    }
    assert registry.token_requests[0]["authorization"] is None
    # The second request sends the cached token straight away.
    registry.registry_requests.clear()
    assert fetch(client, stub) == (200, b"manifest")
    assert registry.issued == 1
    assert registry.registry_requests == ["Bearer t1"]


def test_token_is_refreshed_when_it_expires() -> None:
    registry = FakeRegistry(lifetime=60)
    client, stub, clock = make_client(registry)
    fetch(client, stub)
    clock.advance(30)
    fetch(client, stub)
    assert registry.issued == 1
    clock.advance(25)  # within the safety margin of the 60 s lifetime
    registry.registry_requests.clear()
    fetch(client, stub)
    assert registry.issued == 2
    assert registry.registry_requests == ["Bearer t2"]


def test_a_token_per_repository_scope() -> None:
    registry = FakeRegistry()
    client, stub, _ = make_client(registry)
    fetch(client, stub, "library/nginx")
    fetch(client, stub, "library/alpine")
    assert [r["args"]["scope"] for r in registry.token_requests] == [
        ["repository:library/nginx:pull"],
        ["repository:library/alpine:pull"],
    ]


@pytest.mark.parametrize("lifetime", [float("nan"), float("inf"), 1e300, "1e300", 10**400, -5])
def test_the_tokens_kept_are_bounded_whatever_lifetime_the_token_service_gives(
    lifetime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "MAX_TOKENS", 8)
    registry = FakeRegistry(lifetime=lifetime)
    client, stub, clock = make_client(registry)
    # Every repository a client names is a scope, and a token.
    for i in range(20):
        fetch(client, stub, f"library/r{i}")
    assert len(client._tokens) <= 8
    issued = registry.issued
    clock.advance(upstream.MAX_TOKEN_LIFETIME)
    fetch(client, stub, "library/r19")
    assert registry.issued == issued + 1


def test_credentials_go_to_a_listed_realm() -> None:
    registry = FakeRegistry()
    client, stub, _ = make_client(registry, "user", "pass")
    fetch(client, stub)
    [token_request] = registry.token_requests
    expected = "Basic " + base64.b64encode(b"user:pass").decode()
    assert token_request["authorization"] == expected
    assert token_request["args"]["account"] == ["user"]


@pytest.mark.parametrize("realm", ["https://evil.example/token", "https://evil.docker.io/token"])
def test_credentials_never_go_to_a_foreign_realm(realm: str) -> None:
    registry = FakeRegistry(realm=realm)
    client, stub, _ = make_client(registry, "user", "pass")
    fetch(client, stub)
    [token_request] = registry.token_requests
    assert token_request["authorization"] is None
    assert "account" not in token_request["args"]


def assert_logged_short(events: list[dict[str, Any]]) -> None:
    """Every event was logged, and on one short printable line."""
    assert events
    for event in events:
        text = formatEvent(event)
        assert len(text) < 400 and text.isprintable(), text[:1000]


def test_a_long_token_realm_is_logged_short() -> None:
    realm = "https://evil.example/token?" + "x" * 16_000
    client, stub, _ = make_client(FakeRegistry(realm=realm), "user", "pass")
    with capturedLogs() as events:
        fetch(client, stub)
    assert_logged_short([e for e in events if "not sending" in e["log_format"]])
    with pytest.raises(UpstreamError) as info:  # an error message is logged too
        fetch(*make_client(BrokenTokenService(realm=realm))[:2])
    assert len(str(info.value)) < 400


class GarbledUpstream:
    """An HTTP client whose upstream answers a status line the parser refuses."""

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        line = b"HTTP/1.1 \x1b[31m200" + b"x" * 16_000
        return fail(ResponseNeverReceived([Failure(ParseError("wrong number of parts", line))]))


def test_a_garbled_answer_makes_a_short_error() -> None:
    client = UpstreamClient(
        "hub", "https://registry-1.docker.io", GarbledUpstream(), MemoryReactorClock(), Metrics()
    )
    failures: list[Failure] = []
    Deferred.fromCoroutine(client.request("GET", "library/nginx", "manifests/latest")).addErrback(
        failures.append
    )
    [failure] = failures
    message = str(failure.value)
    assert failure.check(UpstreamError) and "wrong number of parts" in message
    assert len(message) < 400 and message.isprintable(), message[:1000]


def test_a_long_redirect_target_is_logged_short() -> None:
    with capturedLogs() as events:
        registry, result = follow("https://cdn.example/" + "x" * 16_000)
    assert result == b"elsewhere"
    assert_logged_short([e for e in events if "redirects to" in e["log_format"]])


class BasicRegistry(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        if request.getHeader("authorization") != "Basic " + base64.b64encode(b"u:p").decode():
            request.setResponseCode(401)
            request.setHeader("WWW-Authenticate", 'Basic realm="Registry Realm"')
            return b""
        return b"ok"


def test_basic_challenge_uses_configured_credentials() -> None:
    client, stub, _ = make_client(BasicRegistry(), "u", "p")
    assert fetch(client, stub) == (200, b"ok")


def test_basic_challenge_without_credentials_returns_the_401() -> None:
    client, stub, _ = make_client(BasicRegistry())
    assert fetch(client, stub)[0] == 401


class BrokenTokenService(FakeRegistry):
    def render(self, request: Request) -> bytes:
        if request.path == b"/token":
            return b"not json"
        return super().render(request)


def test_a_broken_token_service_is_an_upstream_error() -> None:
    client, stub, _ = make_client(BrokenTokenService())
    with pytest.raises(UpstreamError, match="without a token"):
        fetch(client, stub)


class RedirectingRegistry(FakeRegistry):
    """Blobs redirect to a CDN host, as Docker Hub's do."""

    def __init__(self) -> None:
        super().__init__()
        self.cdn_authorization: list[str | None] = []

    def render(self, request: Request) -> bytes:
        if request.getHeader("host") == "cdn.example":
            self.cdn_authorization.append(request.getHeader("authorization"))
            return b"layer bytes"
        if b"/blobs/" in request.path and request.getHeader("authorization") == "Bearer t1":
            request.setResponseCode(307)
            request.setHeader("Location", "https://cdn.example/blob?sig=abc")
            return b""
        return super().render(request)


def test_redirects_are_followed_without_authorization() -> None:
    registry = RedirectingRegistry()
    client, stub, _ = make_client(registry)

    async def go() -> bytes:
        response = await client.request("GET", "library/nginx", "blobs/sha256:" + "a" * 64)
        body: bytes = await response.content()
        return body

    results: list[Any] = []
    Deferred.fromCoroutine(go()).addBoth(results.append)
    stub.flush()
    assert results == [b"layer bytes"]
    assert registry.cdn_authorization == [None]


class RefusingTokenService(FakeRegistry):
    """A token service that refuses the configured credentials (revoked, say)."""

    def render(self, request: Request) -> bytes:
        if request.path == b"/token":
            request.setResponseCode(401)
            return b'{"details":"incorrect username or password"}'
        return super().render(request)


def test_refused_credentials_are_a_refusal_not_an_outage() -> None:
    # An outage lets the mirror serve expired tags stale; a refusal must not.
    client, stub, _ = make_client(RefusingTokenService(), "u", "revoked")
    assert fetch(client, stub)[0] == 401


class Redirector(Resource):
    """registry-1.docker.io redirects every request to *location*; other hosts answer."""

    isLeaf = True

    def __init__(self, location: str) -> None:
        super().__init__()
        self.location = location
        self.seen: list[tuple[str | None, str | None]] = []

    def render(self, request: Request) -> bytes:
        host = request.getHeader("host")
        self.seen.append((host, request.getHeader("authorization")))
        if host == "registry-1.docker.io":
            request.setResponseCode(302)
            request.setHeader("Location", self.location)
            return b""
        return b"elsewhere"


def follow(location: str) -> tuple[Redirector, Any]:
    registry = Redirector(location)
    client, stub, _ = make_client(registry)
    results: list[Any] = []

    async def go() -> bytes:
        response = await client.request("GET", "library/nginx", "manifests/latest")
        body: bytes = await response.content()
        return body

    Deferred.fromCoroutine(go()).addBoth(results.append)
    stub.flush()
    [result] = results
    return registry, result


@pytest.mark.parametrize(
    "location",
    [
        "http://cdn.example/blob",  # a downgrade from https
        "ftp://cdn.example/blob",
        "file:///etc/passwd",
        "https://user:pass@cdn.example/blob",
        "https://cdn.example:99999/blob",
        "https://cdn.example./blob",
        "https://cdn_example/blob",
        "https://cdn.example/a b",
        "https://[::1]/blob",  # the HTTP client cannot encode an IPv6 literal
        "https://[::ffff:169.254.169.254]:443/blob",
    ],
)
def test_redirects_that_are_refused(location: str) -> None:
    registry, result = follow(location)
    assert isinstance(result, Failure) and result.check(UpstreamError)
    assert result.value.status == 502
    assert [host for host, _ in registry.seen] == ["registry-1.docker.io"]


def test_redirects_are_bounded() -> None:
    registry, result = follow("/v2/library/nginx/manifests/latest")
    assert isinstance(result, Failure) and "more than 5 redirects" in str(result.value)
    assert len(registry.seen) == 6


def test_a_redirect_to_another_https_host_is_followed() -> None:
    registry, result = follow("https://cdn.example/blob")
    assert result == b"elsewhere"
    assert registry.seen[-1] == ("cdn.example", None)


def test_upstream_clients_are_bounded() -> None:
    config = config_module._build("t.toml", {"upstreams": {"gcr": {"plugin": "gcr"}}})
    router = build_router(config, config_module.upstream_plugins())
    egress = Egress(StubTreq(Resource()), None, UpstreamTLS())  # type: ignore[arg-type]
    upstreams = Upstreams({"gcr": egress}, MemoryReactorClock(), Metrics())
    first = upstreams.client(router.route("p/img", ns="r0.gcr.io"))
    for i in range(1, 3 * CLIENTS_LIMIT):
        client = upstreams.client(router.route("p/img", ns=f"r{i}.gcr.io"))
        assert client.base_url == f"https://r{i}.gcr.io"
        assert upstreams.client(router.route("p/img", ns=f"r{i}.gcr.io")) is client
    assert len(upstreams._clients) == CLIENTS_LIMIT
    assert upstreams.client(router.route("p/img", ns="r0.gcr.io")) is not first


class ByHost(Resource):
    """Answers 503 from every host but ``mirror.example``; records the hosts asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[str] = []

    def render(self, request: Request) -> bytes:
        host = (request.getHeader("host") or "").split(":")[0]
        self.hosts.append(host)
        request.setResponseCode(200 if host == "mirror.example" else 503)
        return b"{}"


def test_mirrors_back_the_configured_url_only() -> None:
    table = {"plugin": "gcr", "mirrors": ["https://mirror.example"]}
    config = config_module._build("t.toml", {"upstreams": {"gcr": table}})
    router = build_router(config, config_module.upstream_plugins())
    registry = ByHost()
    egress = Egress(StubTreq(registry), None, UpstreamTLS())  # type: ignore[arg-type]
    upstreams = Upstreams({"gcr": egress}, MemoryReactorClock(), Metrics())
    digest = "sha256:" + "b" * 64

    def code(ns: str) -> int:
        d = Deferred.fromCoroutine(
            upstreams.request(router.route("p/img", ns=ns), "GET", f"blobs/{digest}")
        )
        results: list[Any] = []
        d.addBoth(results.append)
        return int(results[0].code)

    assert code("gcr.io") == 200
    assert registry.hosts == ["gcr.io", "mirror.example"]
    registry.hosts.clear()
    assert code("eu.gcr.io") == 503  # a host picked by a wildcard alias has no fallback
    assert registry.hosts == ["eu.gcr.io"]
