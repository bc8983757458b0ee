import base64

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock

from dockmirror.auth.access import AccessControl, Principal, parse_authorization
from dockmirror.auth.keys import NewKey
from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.throttle import LoginThrottle
from dockmirror.auth.tokens import TokenService
from dockmirror.config import load, upstream_plugins
from dockmirror.errors import RegistryError
from dockmirror.metrics import Metrics
from dockmirror.routing import Router, build_router

SERVICE = "mirror.test:5000"
REALM = "https://mirror.test:5000/docker-auth/token"
CLIENT = "192.0.2.1"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Router:
    path = tmp_path_factory.mktemp("config") / "dockmirror.toml"
    path.write_text(
        """
[upstreams.dockerhub]
plugin = "dockerhub"
default = true
[upstreams.ghcr]
plugin = "ghcr"
"""
    )
    return build_router(load(str(path)), upstream_plugins())


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def make_access(
    key_store: KeyStore, clock: Clock, metrics: Metrics, anonymous: tuple[str, ...] = ()
) -> AccessControl:
    tokens = TokenService(ec.generate_private_key(ec.SECP256R1()), "iss", SERVICE, 300, clock)
    return AccessControl(key_store, tokens, LoginThrottle(clock), metrics, REALM, anonymous)


@pytest.fixture
def access(key_store: KeyStore, clock: Clock, metrics: Metrics) -> AccessControl:
    return make_access(key_store, clock, metrics)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def bearer(access: AccessControl, key: NewKey | None, *names: str) -> str:
    limits = None if key is not None else access.anonymous.limits
    body = access.tokens.issue(key.app_id if key else None, list(names), limits)
    return f"Bearer {body['token']}"


def auth_count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("dockmirror_auth_attempts_total", {"result": result})
    return value or 0.0


async def refused(access: AccessControl, header: str | None, route: object) -> RegistryError:
    with pytest.raises(RegistryError) as info:
        await access.authorize(header, CLIENT, route)  # type: ignore[arg-type]
    return info.value


def test_parse_authorization() -> None:
    assert parse_authorization(None) is None
    assert parse_authorization("Digest x") is None
    creds = parse_authorization(basic("app_a", "sk_b:c"))
    assert creds is not None and (creds.scheme, creds.username, creds.secret) == (
        "basic",
        "app_a",
        "sk_b:c",
    )
    garbled = parse_authorization("Basic %%%")
    assert garbled is not None and (garbled.username, garbled.secret) == ("", "")
    token = parse_authorization("bearer  abc.def.ghi ")
    assert token is not None and (token.scheme, token.secret) == ("bearer", "abc.def.ghi")


@pytest_twisted.ensureDeferred
async def test_no_credentials_challenge(access: AccessControl, router: Router) -> None:
    error = await refused(access, None, None)
    assert error.status == 401 and error.code == "UNAUTHORIZED"
    assert error.message == "authentication required"
    assert error.headers["WWW-Authenticate"] == f'Bearer realm="{REALM}",service="{SERVICE}"'
    error = await refused(access, None, router.route("library/alpine"))
    assert error.headers["WWW-Authenticate"] == (
        f'Bearer realm="{REALM}",service="{SERVICE}",scope="repository:library/alpine:pull"'
    )
    assert error.detail == [{"Type": "repository", "Name": "library/alpine", "Action": "pull"}]


@pytest_twisted.ensureDeferred
async def test_scope_is_the_client_facing_name(access: AccessControl, router: Router) -> None:
    for name in ("alpine", "docker.io/library/alpine", "ghcr.io/owner/img"):
        error = await refused(access, None, router.route(name))
        assert f'scope="repository:{name}:pull"' in error.headers["WWW-Authenticate"]


@pytest_twisted.ensureDeferred
async def test_bearer_token(access: AccessControl, key_store: KeyStore, router: Router) -> None:
    key = await key_store.create("laptop")
    header = bearer(access, key, "library/alpine")
    principal = await access.authorize(header, CLIENT, router.route("library/alpine"))
    assert principal == Principal(key.app_id, None)
    assert await access.authorize(header, CLIENT, None) == principal  # GET /v2/


@pytest_twisted.ensureDeferred
async def test_token_for_another_repository(
    access: AccessControl, key_store: KeyStore, router: Router
) -> None:
    key = await key_store.create("laptop")
    header = bearer(access, key, "library/alpine")
    for name in ("library/nginx", "alpine", "library/alpine/sub", "library"):
        error = await refused(access, header, router.route(name))
        assert error.status == 401
        assert 'error="insufficient_scope"' in error.headers["WWW-Authenticate"]
        assert f'scope="repository:{name}:pull"' in error.headers["WWW-Authenticate"]


@pytest_twisted.ensureDeferred
async def test_expired_token(
    access: AccessControl, key_store: KeyStore, router: Router, clock: Clock, metrics: Metrics
) -> None:
    key = await key_store.create("laptop")
    header = bearer(access, key, "library/alpine")
    clock.advance(300)
    error = await refused(access, header, router.route("library/alpine"))
    assert error.message == "invalid token: token expired"
    assert 'error="invalid_token"' in error.headers["WWW-Authenticate"]
    assert auth_count(metrics, "invalid_token") == 1


@pytest_twisted.ensureDeferred
async def test_tampered_token(access: AccessControl, key_store: KeyStore, router: Router) -> None:
    key = await key_store.create("laptop")
    header = bearer(access, key, "library/alpine")
    error = await refused(access, header[:-4] + "AAAA", router.route("library/alpine"))
    assert 'error="invalid_token"' in error.headers["WWW-Authenticate"]


@pytest_twisted.ensureDeferred
async def test_revoked_key_token(
    access: AccessControl, key_store: KeyStore, router: Router
) -> None:
    key = await key_store.create("laptop")
    header = bearer(access, key, "library/alpine")
    await key_store.revoke(key.app_id)
    error = await refused(access, header, router.route("library/alpine"))
    assert error.message == "the key of this token is revoked"


@pytest_twisted.ensureDeferred
async def test_basic_straight_to_v2(
    access: AccessControl, key_store: KeyStore, router: Router, metrics: Metrics
) -> None:
    key = await key_store.create("curl")
    principal = await access.authorize(basic(key.app_id, key.api_key), CLIENT, None)
    assert principal.app_id == key.app_id
    error = await refused(access, basic(key.app_id, "sk_wrong"), router.route("x/y"))
    assert error.status == 401 and error.message == "invalid appId or apiKey"
    assert error.headers["WWW-Authenticate"].startswith(f'Bearer realm="{REALM}"')
    assert (auth_count(metrics, "success"), auth_count(metrics, "failure")) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_revoked_and_unknown_keys(
    access: AccessControl, key_store: KeyStore, router: Router
) -> None:
    key = await key_store.create("old")
    await key_store.revoke(key.app_id)
    for header in (basic(key.app_id, key.api_key), basic("app_nobody", key.api_key)):
        assert (await refused(access, header, router.route("x/y"))).status == 401


@pytest_twisted.ensureDeferred
async def test_anonymous_repos_match_routed_names(
    key_store: KeyStore, clock: Clock, metrics: Metrics, router: Router
) -> None:
    access = make_access(key_store, clock, metrics, ("dockerhub/library", "ghcr/pub"))
    for name in ("alpine", "library/alpine", "docker.io/library/alpine", "ghcr.io/pub/x"):
        principal = await access.authorize(None, CLIENT, router.route(name))
        assert principal.app_id is None
    for route in (
        router.route("other/x"),
        router.route("ghcr.io/pubx/y"),
        router.route("library/x", ns="ghcr.io"),  # steered to ghcr/library/x
        None,
    ):
        error = await refused(access, None, route)
        assert error.status == 401 and error.message == "authentication required"
    # An anonymous token names the repositories, but the limits still apply.
    token = bearer(access, None, "library/alpine", "other/x")
    assert (await access.authorize(token, CLIENT, router.route("library/alpine"))).app_id is None
    assert (await refused(access, token, router.route("other/x"))).status == 401
    assert (await refused(access, token, None)).status == 401


@pytest_twisted.ensureDeferred
async def test_limited_key(access: AccessControl, key_store: KeyStore, router: Router) -> None:
    key = await key_store.create("ci", ["ghcr/myorg"])
    header = basic(key.app_id, key.api_key)
    assert (await access.authorize(header, CLIENT, router.route("ghcr.io/myorg/app"))).app_id
    error = await refused(access, header, router.route("ghcr.io/other/app"))
    assert (error.status, error.code) == (403, "DENIED")
    _, body = await access.issue(
        parse_authorization(header), CLIENT, SERVICE, ["repository:myorg/app:pull"]
    )
    token = f"Bearer {body['token']}"
    # Granted on the name, but routed to Docker Hub it is outside the key's limits.
    error = await refused(access, token, router.route("myorg/app"))
    assert error.status == 403
    assert await access.authorize(token, CLIENT, router.route("myorg/app", ns="ghcr.io"))


@pytest_twisted.ensureDeferred
async def test_issue(access: AccessControl, key_store: KeyStore) -> None:
    key = await key_store.create("laptop")
    principal, body = await access.issue(
        parse_authorization(basic(key.app_id, key.api_key)),
        CLIENT,
        SERVICE,
        ["repository:library/alpine:pull,push", "registry:catalog:*"],
    )
    assert principal.app_id == key.app_id
    claims = access.tokens.verify(str(body["token"]))
    assert claims.subject == key.app_id and claims.repositories == {"library/alpine"}
    _, body = await access.issue(
        parse_authorization(basic(key.app_id, key.api_key)), CLIENT, None, []
    )
    assert access.tokens.verify(str(body["token"])).repositories == frozenset()


@pytest_twisted.ensureDeferred
async def test_issue_refusals(access: AccessControl, key_store: KeyStore) -> None:
    key = await key_store.create("laptop")
    creds = parse_authorization(basic(key.app_id, key.api_key))
    with pytest.raises(RegistryError) as info:
        await access.issue(creds, CLIENT, "elsewhere.example.com", [])
    assert info.value.code == "DENIED"
    for creds in (None, parse_authorization(basic(key.app_id, "sk_nope"))):
        with pytest.raises(RegistryError) as info:
            await access.issue(creds, CLIENT, SERVICE, ["repository:a:pull"])
        assert info.value.status == 401
        assert info.value.headers["WWW-Authenticate"] == f'Basic realm="{SERVICE}"'


@pytest_twisted.ensureDeferred
async def test_anonymous_token_when_anonymous_repos(
    key_store: KeyStore, clock: Clock, metrics: Metrics
) -> None:
    access = make_access(key_store, clock, metrics, ("dockerhub/library",))
    principal, body = await access.issue(None, CLIENT, SERVICE, ["repository:alpine:pull"])
    claims = access.tokens.verify(str(body["token"]))
    assert principal.app_id is None and claims.subject is None
    assert claims.limits == ("dockerhub/library",)


@pytest_twisted.ensureDeferred
async def test_throttling(
    access: AccessControl, key_store: KeyStore, clock: Clock, metrics: Metrics
) -> None:
    key = await key_store.create("victim")
    good = parse_authorization(basic(key.app_id, key.api_key))
    bad = parse_authorization(basic(key.app_id, "sk_guess"))
    for _ in range(10):
        with pytest.raises(RegistryError) as info:
            await access.issue(bad, CLIENT, SERVICE, [])
        assert info.value.status == 401
    for creds in (good, bad):
        with pytest.raises(RegistryError) as info:
            await access.issue(creds, CLIENT, SERVICE, [])
        assert (info.value.status, info.value.code) == (429, "TOOMANYREQUESTS")
        assert info.value.headers["Retry-After"] == "60"
    # The victim, from an address that has not been failing, logs in.
    await access.issue(good, "198.51.100.9", SERVICE, [])
    other = await key_store.create("other")
    await access.issue(
        parse_authorization(basic(other.app_id, other.api_key)), "10.9.9.9", None, []
    )
    clock.advance(60)
    await access.issue(good, CLIENT, SERVICE, [])
    assert auth_count(metrics, "throttled") == 2
    assert auth_count(metrics, "failure") == 10


@pytest_twisted.ensureDeferred
async def test_record_counts_keys_only(access: AccessControl, key_store: KeyStore) -> None:
    key = await key_store.create("laptop")
    access.record(Principal(key.app_id, None), 1234)
    access.record(access.anonymous, 99)
    await key_store.flush()
    [info] = await key_store.list()
    assert (info.use_count, info.bytes_served) == (1, 1234)
