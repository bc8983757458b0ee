"""The portal's configuration, cookies, charts and ID-token checks, in memory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.server import Request
from twisted.web.template import flattenString
from twisted.web.test.requesthelper import DummyChannel

from dockmirror.config import ConfigError, load
from dockmirror.portal.app import THROTTLE_TOPIC, Portal, unavailable
from dockmirror.portal.charts import Bar, bar_chart, human_bytes
from dockmirror.portal.config import OidcLoginConfig, PortalConfig, client_secret
from dockmirror.portal.login import Identity, LoginRefused, OidcProvider, pkce_challenge
from dockmirror.portal.resource import PortalResource

from .test_config import write

GITHUB = '[portal.login.github]\nclient_id = "id"\nclient_secret = "s3cret"\n'


def test_portal_config(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    config = load(
        write(
            tmp_path,
            '[portal]\nenabled = true\nadmins = ["github:octocat"]\nmax_keys_per_user = 3\n'
            '[portal.login.github]\nclient_id = "id"\n'
            f'client_secret_file = "{secret}"\napi_url = "https://ghe.example.com/api/v3"\n',
        )
    )
    portal = config.portal
    assert portal.enabled and portal.admins == ("github:octocat",) and portal.max_keys_per_user == 3
    assert portal.login.github is not None and portal.login.oidc is None
    assert portal.login.github.api_url == "https://ghe.example.com/api/v3"
    assert client_secret(portal.login.github) == "from-a-file"
    secret.unlink()
    with pytest.raises(ValueError, match=f"cannot read {secret}"):
        client_secret(portal.login.github)
    assert load(None).portal == PortalConfig()  # off by default
    assert "s3cret" not in repr(load(write(tmp_path, "[portal]\n" + GITHUB)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[portal]\nenabled = true\n", "needs a sign-in provider"),
        (
            "[portal]\nadmins = ['octocat']\n" + GITHUB,
            "portal.admins: 'octocat' is not an identity",
        ),
        ("[portal]\nmax_keys_per_user = 0\n" + GITHUB, "max_keys_per_user must be 1 or more"),
        ("[portal]\nallowed_orgs = ['acme']\n", "allowed_orgs needs [portal.login.github]"),
        (GITHUB + 'client_secret_file = "/x"\n', "one of client_secret and client_secret_file"),
        (GITHUB + 'colour = "red"\n', "unknown key portal.login.github.colour"),
        (
            '[portal.login.oidc]\nclient_id = "x"\nclient_secret = "y"\n',
            "missing key portal.login.oidc.issuer",
        ),
        (GITHUB + 'api_url = "ftp://x"\n', "is not an http(s) URL"),
        ("[portal]\nsession_ttl = 5\n" + GITHUB, "session_ttl must be between"),
    ],
)
def test_portal_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        load(write(tmp_path, text))


def _portal(public_url: str) -> Portal:
    return Portal(
        PortalConfig(),
        public_url,
        None,
        None,
        [],
        b"k" * 32,
        b"c" * 32,
        None,
        str,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("public_url", "name", "secure"),
    [
        ("https://mirror.example.com", b"__Host-dockmirror_session", True),
        ("http://127.0.0.1:5000", b"dockmirror_session", False),
    ],
)
def test_session_cookie_follows_public_url(public_url: str, name: bytes, secure: bool) -> None:
    portal = _portal(public_url)
    request = Request(DummyChannel())
    portal.set_cookie(request, portal.session_cookie, "value", 60)
    (cookie,) = request.cookies
    assert cookie.startswith(name + b"=value; ")
    attributes = cookie.split(b"; ")
    assert b"Path=/" in attributes and b"HttpOnly" in attributes
    assert b"SameSite=lax" in attributes and b"Max-Age=60" in attributes
    assert (b"Secure" in attributes) is secure


@pytest_twisted.ensureDeferred
async def test_bar_chart_escapes_and_scales() -> None:
    bars = [Bar("<1>", "day <1>", 0), Bar("2", "day 2", 1500), Bar("3", "day 3", 3000)]
    svg = (await flattenString(None, bar_chart(bars, human_bytes, "Traffic & more"))).decode()
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 720 220"')
    assert "&lt;1&gt;" in svg and "<1>" not in svg and "Traffic &amp; more" in svg
    assert "<title>day 3: 3 kB</title>" in svg and ">5 kB</text>" in svg  # the axis top
    assert "style=" not in svg  # the CSP allows no inline style
    empty = await flattenString(None, bar_chart([Bar("1", "1", 0)], str, "Requests"))
    assert empty == b'<p class="no-data">Requests: nothing yet.</p>'
    assert [human_bytes(n) for n in (0, 999, 1000, 1_550_000)] == ["0 B", "999 B", "1 kB", "1.6 MB"]


# --- OpenID Connect ------------------------------------------------------------------------

ISSUER = "https://idp.example.com"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class _Response:
    def __init__(self, body: Any) -> None:
        self.code = 200
        self.length = None
        self._body = json.dumps(body).encode()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class _Http:
    """Answers discovery and the JWKS; counts requests."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        self.requests.append(url)
        if url.endswith("/.well-known/openid-configuration"):
            return succeed(
                _Response(
                    {
                        "issuer": ISSUER,
                        "authorization_endpoint": f"{ISSUER}/auth",
                        "token_endpoint": f"{ISSUER}/token",
                        "jwks_uri": f"{ISSUER}/jwks",
                        "id_token_signing_alg_values_supported": ["RS256"],
                    }
                )
            )
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
        return succeed(_Response({"keys": [{**jwk, "kid": "k1", "use": "sig"}]}))


class _Clock:
    def seconds(self) -> float:
        return time.time()


def _token(key: Any = KEY, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": "client",
        "sub": "u1",
        "iat": now,
        "exp": now + 300,
        "nonce": "n",
    }
    payload.update(claims)
    return jwt.encode(
        {k: v for k, v in payload.items() if v is not None}, key, alg, headers={"kid": "k1"}
    )


@pytest_twisted.ensureDeferred
async def test_id_token_validation() -> None:
    http = _Http()
    provider = OidcProvider(OidcLoginConfig(ISSUER, "client", "secret"), "secret", http, _Clock())
    claims = await provider.validate(_token(), "n")
    assert claims["sub"] == "u1"
    refused = {
        "audience": _token(aud="someone-else"),
        "signature": _token(key=OTHER_KEY),
        "issuer": _token(iss="https://evil.example.com"),
        "expiry": _token(exp=int(time.time()) - 3600),
        "nonce": _token(nonce="replayed"),
        "missing exp": _token(exp=None),
        "hmac": jwt.encode({"sub": "u1"}, "secret" * 8, "HS256", headers={"kid": "k1"}),
        "none": jwt.encode({"sub": "u1"}, None, "none"),
        "several audiences, no azp": _token(aud=["client", "other"]),
    }
    for what, token in refused.items():
        with pytest.raises(LoginRefused):
            await provider.validate(token, "n")
        assert what  # each case named for the reader
    # The JWKS is fetched once, and again (at most once a minute) for an unknown kid.
    assert http.requests.count(f"{ISSUER}/jwks") == 1


def test_pkce_challenge_is_what_an_authorization_server_checks() -> None:
    s256 = pytest.importorskip("authlib.oauth2.rfc7636").create_s256_code_challenge
    for verifier in ("a" * 43, "dBjftJeZ4CVP-mJ92K5ZXvwC8WUQ6ODgTkk6BADxpcM"):
        assert pkce_challenge(verifier) == s256(verifier)


def _get(resource: PortalResource, path: bytes) -> tuple[Request, bytes]:
    """A GET of ``/portal/PATH`` rendered by *resource*, and what was sent."""
    channel = DummyChannel()
    request = Request(channel)
    request.method = b"GET"
    request.uri = request.path = b"/portal/" + path
    request.prepath, request.postpath = [b"portal"], path.split(b"/")
    resource.render(request)
    return request, channel.transport.written.getvalue()


@pytest.mark.parametrize(
    "path, shown",
    [
        (b"", b"<p>The portal's database is unavailable; please try again in a moment.</p>"),
        (b"api/keys", b'{"error": "the portal\'s database is unavailable; please try again'),
    ],
)
def test_an_error_is_a_sentence_on_a_page_and_as_it_is_in_the_api(
    path: bytes, shown: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    portal = _portal("https://mirror.example.com")

    async def down(request: Request) -> None:
        raise unavailable("the portal's database is unavailable")

    monkeypatch.setattr(portal, "visitor", down)
    request, body = _get(PortalResource(portal, None), path)  # type: ignore[arg-type]
    assert request.code == 503 and shown in body, body


@pytest.mark.parametrize("path", [b"", b"api/keys"])
def test_an_unexpected_error_is_a_500_answer_not_a_trace(
    path: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    portal = _portal("https://mirror.example.com")

    async def broken(request: Request) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(portal, "visitor", broken)
    request, body = _get(PortalResource(portal, None), path)  # type: ignore[arg-type]
    assert request.finished and request.code == 500
    assert b"secret detail" not in body and b"Traceback" not in body
    assert b"went wrong on the server; it has been logged" in body
    headers = request.responseHeaders
    assert headers.getRawHeaders("content-security-policy")[0].startswith("default-src 'none'")
    assert headers.getRawHeaders("x-frame-options") == ["DENY"]
    assert headers.getRawHeaders("referrer-policy") == ["no-referrer"]
    kind = "application/json" if path else "text/html; charset=utf-8"
    assert headers.getRawHeaders("content-type") == [kind]


def test_who_may_sign_in() -> None:
    config = PortalConfig(
        admins=("github:Root",), allowed_users=("oidc:AbC", "github:Carol"), allowed_orgs=("Acme",)
    )
    portal = Portal(config, "http://m", None, None, [], b"k", b"c", None, str)  # type: ignore[arg-type]
    for identity, orgs, allowed in (
        ("github:root", (), True),  # admins always
        ("github:carol", (), True),  # GitHub logins are case-insensitive
        ("oidc:AbC", (), True),
        ("oidc:abc", (), False),  # OIDC subjects are not
        ("github:dave", ("acme",), True),
        ("github:erin", ("other",), False),
    ):
        assert portal.may_sign_in(Identity(identity, "x", frozenset(orgs))) is allowed, identity
    anyone = Portal(PortalConfig(), "http://m", None, None, [], b"k", b"c", None, str)  # type: ignore[arg-type]
    assert anyone.may_sign_in(Identity("oidc:whoever", "x"))


class Announcements:
    """A notifier that keeps what is published and hands the listeners out."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str]]] = []
        self.listeners: dict[str, Any] = {}

    def publish(self, topic: str, message: list[str]) -> None:
        self.sent.append((topic, message))

    def subscribe(self, topic: str, listener: Any) -> None:
        self.listeners[topic] = listener


def test_attempts_are_counted_in_every_process() -> None:
    portal = Portal(PortalConfig(), "http://m", None, None, [], b"k", b"c", Clock(), str)  # type: ignore[arg-type]
    notifier = Announcements()
    portal.share(notifier)  # type: ignore[arg-type]
    heard = notifier.listeners[THROTTLE_TOPIC]
    portal._attempt("sign-in", "10.0.0.1")
    assert notifier.sent == [(THROTTLE_TOPIC, ["sign-in", "10.0.0.1"])]
    for _ in range(9):  # attempts another node saw
        heard(["sign-in", "10.0.0.1"])
    assert portal.sign_in_throttle.retry_after("10.0.0.1") is not None
    assert len(notifier.sent) == 1  # what was heard is not sent again
    # Only well-formed news of a known throttle counts.
    for message in (["create"], ["nope", "x"], ["create", "x" * 201], ["create", "a", "b"]):
        heard(message)
    heard(["create", "portal user github:alice"])
    assert portal.create_throttle.failures("portal user github:alice") == 1
    assert portal.create_throttle.failures("x" * 201) == 0
