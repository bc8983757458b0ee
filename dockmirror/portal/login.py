"""Signing in with GitHub (OAuth2) or an OpenID Connect issuer, with PKCE.

A provider builds the URL the browser is sent to and, once it comes back
with a code, turns the code into an :class:`Identity`.  What goes wrong
there is either :class:`LoginRefused` (the provider or its answer says no:
a 403 page) or :class:`ProviderUnavailable` (it cannot be reached or answers
nonsense: a 502 page).  Neither message ever holds a token or a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import jwt
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.web.client import ResponseFailed

from dockmirror import jsontext
from dockmirror.portal.config import GitHubLoginConfig, OidcLoginConfig
from dockmirror.upstream import UpstreamError, read_small

log = Logger()

USER_AGENT = "dockmirror-portal"
#: Seconds to wait for a provider's response headers.
TIMEOUT = 10
#: Largest provider response read (JSON documents, JWKS).
MAX_RESPONSE = 1 << 20
#: ID-token signature algorithms accepted: asymmetric ones only.
ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384")
#: Clock skew tolerated on ID-token times.
LEEWAY = 60
#: Seconds before the JWKS is fetched again for an unknown ``kid``.
JWKS_REFRESH = 60
GITHUB_LOGIN_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})")


class LoginRefused(Exception):
    """The provider, or its answer, refuses this sign-in."""


class ProviderUnavailable(Exception):
    """The provider cannot be reached or answered nonsense."""


@dataclass(frozen=True)
class Identity:
    """Who signed in: ``PROVIDER:LOGIN``, a display name, and GitHub organisations."""

    identity: str
    name: str
    orgs: frozenset[str] = frozenset()


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of *verifier* (RFC 7636)."""
    return (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )


class Provider(Protocol):
    name: str
    label: str

    async def authorize_url(
        self, redirect_uri: str, state: str, verifier: str, nonce: str
    ) -> str: ...

    async def complete(
        self, code: str, redirect_uri: str, verifier: str, nonce: str
    ) -> Identity: ...


class _Client:
    """JSON over treq for one provider, mapping transport trouble to ProviderUnavailable."""

    def __init__(self, http: Any, label: str) -> None:
        self._http = http
        self.label = label

    async def json(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})}
        try:
            response = await self._http.request(
                method, url, headers=all_headers, timeout=TIMEOUT, **kwargs
            )
            body = await read_small(response, MAX_RESPONSE)
        except (ConnectError, DNSLookupError, TimeoutError, ResponseFailed, CancelledError) as e:
            log.warn("{label} unreachable at {url}: {error}", label=self.label, url=url, error=e)
            raise ProviderUnavailable(f"{self.label} cannot be reached") from None
        except UpstreamError as e:  # read_small: too large, or cut short
            log.warn(
                "{label} answer from {url} unusable: {error}", label=self.label, url=url, error=e
            )
            raise ProviderUnavailable(f"{self.label} sent an unusable answer") from None
        if response.code >= 500:
            log.warn(
                "{label} answered {status} at {url}",
                label=self.label,
                status=response.code,
                url=url,
            )
            raise ProviderUnavailable(f"{self.label} answered with an error ({response.code})")
        try:
            return response.code, jsontext.loads(body)
        except ValueError:
            raise ProviderUnavailable(f"{self.label} sent an answer that is not JSON") from None


def _error_text(answer: Any) -> str:
    """A provider's OAuth error, short and printable (never a token)."""
    if not isinstance(answer, dict):
        return "unknown error"
    text = str(answer.get("error_description") or answer.get("error") or "unknown error")
    return "".join(c for c in text if c.isprintable())[:200]


class GitHubProvider:
    """GitHub or GitHub Enterprise, as an OAuth app: identities ``github:LOGIN``."""

    name = "github"
    label = "GitHub"

    def __init__(self, config: GitHubLoginConfig, secret: str, http: Any, want_orgs: bool) -> None:
        self._config = config
        self._secret = secret
        self._client = _Client(http, self.label)
        self._want_orgs = want_orgs

    async def authorize_url(self, redirect_uri: str, state: str, verifier: str, nonce: str) -> str:
        query = {
            "response_type": "code",
            "client_id": self._config.client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "scope": "read:org" if self._want_orgs else "",
            "code_challenge": pkce_challenge(verifier),
            "code_challenge_method": "S256",
            "allow_signup": "false",
        }
        return f"{self._config.authorize_url}?{urlencode(query)}"

    async def complete(self, code: str, redirect_uri: str, verifier: str, nonce: str) -> Identity:
        status, answer = await self._client.json(
            "POST",
            self._config.token_url,
            data={
                "grant_type": "authorization_code",
                "client_id": self._config.client_id,
                "client_secret": self._secret,
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            },
        )
        # GitHub answers token errors with 200 and an "error" field.
        if not isinstance(answer, dict) or "error" in answer or status != 200:
            raise LoginRefused(f"GitHub refused the sign-in: {_error_text(answer)}")
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise ProviderUnavailable("GitHub sent no access token")
        user = await self._api("/user", token)
        login = user.get("login") if isinstance(user, dict) else None
        if not isinstance(login, str) or not GITHUB_LOGIN_RE.fullmatch(login):
            raise ProviderUnavailable("GitHub sent no valid login")
        orgs: frozenset[str] = frozenset()
        if self._want_orgs:
            listed = await self._api("/user/orgs?per_page=100", token)
            if not isinstance(listed, list):
                raise ProviderUnavailable("GitHub sent no list of organisations")
            orgs = frozenset(
                o["login"].lower()
                for o in listed
                if isinstance(o, dict) and isinstance(o.get("login"), str)
            )
        name = user.get("name") if isinstance(user.get("name"), str) else None
        return Identity(f"github:{login.lower()}", (name or login)[:100], orgs)

    async def _api(self, path: str, token: str) -> Any:
        status, answer = await self._client.json(
            "GET",
            self._config.api_url.rstrip("/") + path,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
            },
        )
        if status in (401, 403):
            raise LoginRefused(
                f"GitHub refused access to {path.split('?')[0]}: {_error_text(answer)}"
            )
        if status != 200:
            raise ProviderUnavailable(f"GitHub answered {status} for {path.split('?')[0]}")
        return answer


class OidcProvider:
    """An OpenID Connect issuer, found by discovery: identities ``oidc:SUB``."""

    name = "oidc"

    def __init__(self, config: OidcLoginConfig, secret: str, http: Any, clock: Any) -> None:
        self._config = config
        self._secret = secret
        self.label = config.label
        self._client = _Client(http, config.label)
        self._clock = clock
        self._metadata: dict[str, Any] | None = None
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_fetched = -float(JWKS_REFRESH)

    @property
    def issuer(self) -> str:
        return self._config.issuer.rstrip("/")

    async def metadata(self) -> dict[str, Any]:
        """The issuer's discovery document, fetched once and checked."""
        if self._metadata is None:
            url = self.issuer + "/.well-known/openid-configuration"
            status, document = await self._client.json("GET", url)
            if status != 200 or not isinstance(document, dict):
                raise ProviderUnavailable(f"{self.label} has no discovery document ({status})")
            if document.get("issuer", "").rstrip("/") != self.issuer:
                raise ProviderUnavailable(f"{self.label}'s discovery document names another issuer")
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                value = document.get(key)
                if not isinstance(value, str) or not value.startswith(("https://", "http://")):
                    raise ProviderUnavailable(f"{self.label}'s discovery document lacks {key}")
            self._metadata = document
        return self._metadata

    async def authorize_url(self, redirect_uri: str, state: str, verifier: str, nonce: str) -> str:
        metadata = await self.metadata()
        query = {
            "response_type": "code",
            "client_id": self._config.client_id,
            "redirect_uri": redirect_uri,
            "scope": "openid profile email",
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce_challenge(verifier),
            "code_challenge_method": "S256",
        }
        endpoint = metadata["authorization_endpoint"]
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(query)}"

    async def complete(self, code: str, redirect_uri: str, verifier: str, nonce: str) -> Identity:
        metadata = await self.metadata()
        credentials = base64.b64encode(
            f"{_form(self._config.client_id)}:{_form(self._secret)}".encode()
        ).decode()
        status, answer = await self._client.json(
            "POST",
            metadata["token_endpoint"],
            headers={"Authorization": f"Basic {credentials}"},
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            },
        )
        if status != 200 or not isinstance(answer, dict) or "error" in answer:
            raise LoginRefused(f"{self.label} refused the sign-in: {_error_text(answer)}")
        id_token = answer.get("id_token")
        if not isinstance(id_token, str):
            raise LoginRefused(f"{self.label} sent no ID token")
        claims = await self.validate(id_token, nonce)
        subject = claims["sub"]
        name = next(
            (
                claims[k]
                for k in ("preferred_username", "name", "email")
                if isinstance(claims.get(k), str) and claims[k]
            ),
            subject,
        )
        return Identity(f"oidc:{subject}", name[:100])

    async def validate(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The claims of *id_token*, checked: signature, issuer, audience, times and nonce."""
        metadata = await self.metadata()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.InvalidTokenError:
            raise LoginRefused(f"{self.label} sent an ID token that is not a JWT") from None
        algorithm = header.get("alg")
        supported = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        if algorithm not in ID_TOKEN_ALGORITHMS or algorithm not in supported:
            raise LoginRefused(f"{self.label}'s ID token is signed with {str(algorithm)[:10]!r}")
        key = await self._signing_key(metadata["jwks_uri"], header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key.key,
                algorithms=[algorithm],
                audience=self._config.client_id,
                issuer=metadata["issuer"],
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError as e:
            raise LoginRefused(f"{self.label}'s ID token is not valid: {e}") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self._config.client_id:
            raise LoginRefused(f"{self.label}'s ID token was issued to another party")
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise LoginRefused(f"{self.label}'s ID token is for another sign-in (nonce)")
        subject = claims["sub"]
        if not isinstance(subject, str) or not re.fullmatch(r"\S{1,200}", subject):
            raise LoginRefused(f"{self.label}'s ID token has no usable subject")
        return claims

    async def _signing_key(self, jwks_uri: str, kid: Any) -> jwt.PyJWK:
        """The issuer's key *kid*, fetching the JWKS again (at most once a minute) if unknown."""
        key = self._find(kid)
        now = self._clock.seconds()
        if key is None and now - self._jwks_fetched >= JWKS_REFRESH:
            self._jwks_fetched = now
            status, document = await self._client.json("GET", jwks_uri)
            if status != 200 or not isinstance(document, dict):
                raise ProviderUnavailable(f"{self.label}'s JWKS is unavailable ({status})")
            try:
                self._jwks = jwt.PyJWKSet.from_dict(document)
            except jwt.PyJWTError:
                raise ProviderUnavailable(f"{self.label}'s JWKS holds no usable key") from None
            key = self._find(kid)
        if key is None:
            raise LoginRefused(f"{self.label}'s ID token is signed by an unknown key")
        return key

    def _find(self, kid: Any) -> jwt.PyJWK | None:
        if self._jwks is None:
            return None
        keys = [k for k in self._jwks.keys if k.public_key_use in (None, "sig")]
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((k for k in keys if k.key_id == kid), None)


def _form(value: str) -> str:
    """``application/x-www-form-urlencoded``, as client_secret_basic wants (RFC 6749 2.3.1)."""
    return urlencode({"": value})[1:]
