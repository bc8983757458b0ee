"""Who may pull what: logins, token grants and the check on each ``/v2`` request.

Two kinds of name meet here.  Tokens grant and are checked on the
*client-facing* name, the one in the request path and in the client's
``scope`` (``alpine``, ``library/alpine`` and ``docker.io/library/alpine`` are
three different scopes, though one repository).  Limits, that is
``[auth] anonymous_repos`` and a key's repositories, are checked on the
*routed* name, ``UPSTREAM/REPOSITORY`` (``dockerhub/library/alpine``), once
the request is routed: so one rule covers every spelling, and a Host header
or ``?ns=`` that steers a name to another upstream cannot slip past it.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.logger import Logger

from dockmirror.auth.keys import KeyStoreError
from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.throttle import LoginThrottle
from dockmirror.auth.tokens import InvalidToken, TokenService, requested_repositories
from dockmirror.errors import RegistryError
from dockmirror.metrics import Metrics
from dockmirror.routing import Route

log = Logger()


def covers(prefixes: Sequence[str], key: str) -> bool:
    """Whether *key* is one of *prefixes* or below one of them, by whole components."""
    return any(key == prefix or key.startswith(prefix + "/") for prefix in prefixes)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from."""

    app_id: str | None  # None: anonymous
    #: ``UPSTREAM/PREFIX`` rules this principal may pull from; None: everything.
    limits: tuple[str, ...] | None

    def may_pull(self, route: Route) -> bool:
        return self.limits is None or covers(self.limits, route.key)


@dataclass(frozen=True)
class Credentials:
    """A ``Basic`` appId:apiKey pair or a ``Bearer`` token, as the client sent it."""

    scheme: str  # "basic" or "bearer"
    username: str = ""
    secret: str = field(default="", repr=False)


def parse_authorization(header: str | None) -> Credentials | None:
    """The credentials in an ``Authorization`` header; a malformed one is empty Basic."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer":
        return Credentials("bearer", secret=value)
    if scheme != "basic":
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8
        return Credentials("basic")
    username, _, password = decoded.partition(":")
    return Credentials("basic", username, password)


class AccessControl:
    """Logins with API keys, the token endpoint's grants, and ``/v2`` checks.

    Counts ``dockmirror_auth_attempts_total`` by result: ``success`` and
    ``failure`` for appId:apiKey logins (at the token endpoint or as Basic on
    ``/v2``), ``throttled`` for logins refused with 429, and ``invalid_token``
    for bearer tokens refused (forged, expired, or of a revoked key).
    """

    def __init__(
        self,
        keys: KeyStore,
        tokens: TokenService,
        throttle: LoginThrottle,
        metrics: Metrics,
        realm: str,
        anonymous_repos: Sequence[str] = (),
    ) -> None:
        self.keys = keys
        self.tokens = tokens
        self.throttle = throttle
        self._metrics = metrics
        self.realm = realm
        self.anonymous = Principal(None, tuple(anonymous_repos))

    @property
    def service(self) -> str:
        return self.tokens.service

    async def login(self, username: str, password: str, client: str) -> Principal | None:
        """The key's principal if *username*:*password* is a valid appId:apiKey.

        Raises TOOMANYREQUESTS while *client* is throttled, for its own failures.
        """
        wait = self.throttle.retry_after(username, client)
        if wait is not None:
            self._metrics.auth.labels("throttled").inc()
            raise RegistryError(
                "TOOMANYREQUESTS",
                "too many failed logins; try again later",
                {"retryAfter": wait},
                headers={"Retry-After": str(wait)},
            )
        try:
            key = await self.keys.verify(username, password)
        except KeyStoreError as e:
            log.error("cannot check a login: {error}", error=str(e))
            raise RegistryError("UNAVAILABLE", "the key store is unavailable", status=503) from e
        if key is None:
            self._metrics.auth.labels("failure").inc()
            self.throttle.failed(username, client)
            log.info("failed login as {app_id} from {client}", app_id=username[:80], client=client)
            return None
        self._metrics.auth.labels("success").inc()
        return Principal(key.app_id, key.repositories)

    async def issue(
        self,
        credentials: Credentials | None,
        client: str,
        service: str | None,
        scopes: Sequence[str],
    ) -> tuple[Principal, dict[str, object]]:
        """Answer a token request: the principal, and the token response body."""
        if service is not None and service != self.service:
            raise RegistryError(
                "DENIED",
                f"this token service issues tokens for {self.service} only",
                {"service": service[:255]},
            )
        if credentials is None:
            if not self.anonymous.limits:
                raise self._login_required("authentication required")
            principal = self.anonymous
        else:
            found = await self.login(credentials.username, credentials.secret, client)
            if found is None:
                raise self._login_required("invalid appId or apiKey")
            principal = found
        names = requested_repositories(scopes)
        return principal, self.tokens.issue(principal.app_id, names, principal.limits)

    def _login_required(self, message: str) -> RegistryError:
        return RegistryError(
            "UNAUTHORIZED",
            message,
            headers={"WWW-Authenticate": f'Basic realm="{self.service}"'},
        )

    async def authorize(self, header: str | None, client: str, route: Route | None) -> Principal:
        """Check a ``/v2`` request; *route* is None for the base and catalog endpoints.

        Returns who the request comes from, or raises the registry error to
        answer: 401 with a Bearer challenge, 403 for a key limited elsewhere,
        429 while throttled.
        """
        credentials = parse_authorization(header)
        if credentials is None:
            principal = self.anonymous
        elif credentials.scheme == "basic":
            found = await self.login(credentials.username, credentials.secret, client)
            if found is None:
                raise self._challenge(route, "invalid appId or apiKey")
            principal = found
        else:
            principal = self._bearer(credentials.secret, route)
        if principal.app_id is None:
            # A 401, not a 403: logging in helps, and docker falls back from
            # a registry mirror on a 401 only.
            if route is None or not principal.may_pull(route):
                raise self._challenge(route, "authentication required")
        elif route is not None and not principal.may_pull(route):
            raise RegistryError(
                "DENIED", f"this key may not pull {route.client_name}", {"name": route.client_name}
            )
        return principal

    def _bearer(self, token: str, route: Route | None) -> Principal:
        try:
            claims = self.tokens.verify(token)
        except InvalidToken as e:
            self._metrics.auth.labels("invalid_token").inc()
            raise self._challenge(route, f"invalid token: {e}", "invalid_token") from None
        if claims.subject is not None and claims.subject in self.keys.revoked:
            self._metrics.auth.labels("invalid_token").inc()
            raise self._challenge(route, "the key of this token is revoked", "invalid_token")
        if route is not None and route.client_name not in claims.repositories:
            raise self._challenge(
                route, f"token does not grant pull on {route.client_name}", "insufficient_scope"
            )
        return Principal(claims.subject, claims.limits)

    def _challenge(
        self, route: Route | None, message: str, error: str | None = None
    ) -> RegistryError:
        """A 401 that tells the client where to get a token, and for what scope."""
        params = [f'realm="{self.realm}"', f'service="{self.service}"']
        detail = None
        if route is not None:
            params.append(f'scope="repository:{route.client_name}:pull"')
            detail = [{"Type": "repository", "Name": route.client_name, "Action": "pull"}]
        if error is not None:
            params.append(f'error="{error}"')
        return RegistryError(
            "UNAUTHORIZED",
            message,
            detail,
            headers={"WWW-Authenticate": "Bearer " + ",".join(params)},
        )

    def record(self, principal: Principal, nbytes: int) -> None:
        """Count a request served to *principal* that sent *nbytes*."""
        if principal.app_id is not None:
            self.keys.record(principal.app_id, nbytes)
