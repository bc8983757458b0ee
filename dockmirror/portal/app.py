"""What the portal does, for the pages and the JSON API alike.

Sign-in and sign-out, who is signed in, CSRF checks, and keys that belong to
people: every operation checks the owner, the quota and the throttles, and
writes an audit event (``dockmirror.audit``) naming the key, the actor and
the client address, never a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web.server import Request

from dockmirror._interfaces import INotifier
from dockmirror.auth.keys import DAY, KeyInfo, KeyList, KeyStoreError, NewKey, QuotaExceeded
from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.throttle import Throttle, client_subject
from dockmirror.portal.config import IDENTITY_RE, PortalConfig, normalize_identity
from dockmirror.portal.login import Identity, LoginRefused, Provider, ProviderUnavailable
from dockmirror.portal.sessions import (
    LOGIN_TTL,
    PendingLogin,
    PortalQueries,
    PortalStore,
    PortalStoreError,
    Session,
    User,
)
from dockmirror.portal.users import disable_user

log = Logger()
audit = Logger(namespace="dockmirror.audit")

APP_ID_RE = re.compile(r"app_[a-z0-9]{1,40}")
#: Repository limits one key may carry.
MAX_REPOSITORIES = 20
#: Days of usage one request may ask for.
MAX_USAGE_DAYS = 30
SIGN_IN_LIMIT = (10, 60.0)
CREATE_LIMIT = (10, 3600.0)
#: Seconds a browser is asked to wait while a database is unavailable.
RETRY_AFTER = 5
#: What a process announces of the attempts it counted: ``[throttle, subject]``.
THROTTLE_TOPIC = "portal-attempt"
#: Longest throttle subject heard from another process.
MAX_SUBJECT = 200


class PortalError(Exception):
    """A request the portal answers with *status* and a message fit to show."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Visitor:
    """The signed-in person behind a request."""

    session: Session
    admin: bool
    csrf_token: str
    client: str

    @property
    def identity(self) -> str:
        return self.session.identity


def unavailable(what: str) -> PortalError:
    """A 503 for a database that is down: a page, or the API's error, never a traceback."""
    return PortalError(
        503, f"{what}; please try again in a moment", {"Retry-After": str(RETRY_AFTER)}
    )


def _sign(secret: bytes, value: str) -> str:
    mac = hmac.new(secret, value.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _same(sent: str, expected: str) -> bool:
    """Constant-time equality of a value from a client (any text) and a known one."""
    return hmac.compare_digest(sent.encode(), expected.encode())


def client_address(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "-"))


class Portal:
    """The portal's state and operations; see the module docstring."""

    def __init__(
        self,
        config: PortalConfig,
        public_url: str,
        keys: KeyStore,
        store: PortalStore,
        providers: Sequence[Provider],
        session_secret: bytes,
        csrf_secret: bytes,
        reactor: Any,
        check_prefix: Callable[[str], str],
    ) -> None:
        self.config = config
        self.public_url = public_url.rstrip("/")
        self.keys = keys
        self.store = store
        self.providers = {p.name: p for p in providers}
        self._session_secret = session_secret
        self._csrf_secret = csrf_secret
        self._reactor = reactor
        self._check_prefix = check_prefix
        self.sign_in_throttle = Throttle(
            reactor, *SIGN_IN_LIMIT, event="tried to sign in to the portal"
        )
        self.create_throttle = Throttle(reactor, *CREATE_LIMIT, event="created portal keys")
        self._throttles = {"sign-in": self.sign_in_throttle, "create": self.create_throttle}
        self._notifier: INotifier | None = None
        secure = urlsplit(self.public_url).scheme == "https"
        self.secure_cookies = secure
        prefix = "__Host-" if secure else ""
        self.session_cookie = f"{prefix}dockmirror_session"
        self.login_cookie = f"{prefix}dockmirror_login"
        self._admins = {normalize_identity(a) for a in config.admins}
        self._allowed = {normalize_identity(a) for a in config.allowed_users}
        self._orgs = {o.lower() for o in config.allowed_orgs}

    def share(self, notifier: INotifier) -> None:
        """Count the attempts of every process (and node) *notifier* reaches."""
        self._notifier = notifier
        notifier.subscribe(THROTTLE_TOPIC, self._heard)

    def _attempt(self, throttle: str, subject: str) -> None:
        self._throttles[throttle].failed(subject)
        if self._notifier is not None:
            self._notifier.publish(THROTTLE_TOPIC, [throttle, subject[:MAX_SUBJECT]])

    def _heard(self, message: list[str]) -> None:
        """Count an attempt another process saw."""
        if len(message) == 2 and message[0] in self._throttles and len(message[1]) <= MAX_SUBJECT:
            self._throttles[message[0]].failed(message[1])

    @property
    def host(self) -> str:
        """This mirror's host as clients name it (``mirror.example.com``)."""
        return urlsplit(self.public_url).netloc

    # --- cookies and sessions ---------------------------------------------------------

    def set_cookie(self, request: Request, name: str, value: str, max_age: int) -> None:
        request.addCookie(
            name,
            value,
            path="/",
            max_age=str(max_age),
            secure=self.secure_cookies,
            httpOnly=True,
            sameSite="lax",
        )

    def _cookie(self, request: Request, name: str) -> str | None:
        value = request.getCookie(name.encode())
        if value is None or len(value) > 200:
            return None
        return value.decode("ascii", "replace")

    async def visitor(self, request: Request) -> Visitor | None:
        """Who is signed in on *request*, if anyone."""
        cookie = self._cookie(request, self.session_cookie)
        if cookie is None:
            return None
        session_id, _, signature = cookie.partition(".")
        if not _same(signature, _sign(self._session_secret, session_id)):
            return None
        session = await self._db(PortalQueries.get_session, session_id)
        if session is None:
            return None
        return Visitor(
            session,
            admin=session.identity in self._admins,
            csrf_token=_sign(self._csrf_secret, session_id),
            client=client_address(request),
        )

    @staticmethod
    def check_csrf(visitor: Visitor, sent: str | None) -> None:
        """Refuse (403) a state-changing request without this session's CSRF token."""
        if sent is None or not _same(sent, visitor.csrf_token):
            raise PortalError(403, "missing or wrong CSRF token; reload the page and try again")

    async def _db(self, f: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self.store.run(f, *args)
        except PortalStoreError as e:
            log.error("portal database: {error}", error=str(e))
            raise unavailable("the portal's database is unavailable") from e

    # --- signing in and out -----------------------------------------------------------

    def provider(self, name: str) -> Provider:
        provider = self.providers.get(name)
        if provider is None:
            raise PortalError(404, "no such sign-in provider")
        return provider

    def redirect_uri(self, provider: Provider) -> str:
        return f"{self.public_url}/portal/login/{provider.name}/callback"

    def _throttle_sign_in(self, client: str) -> None:
        wait = self.sign_in_throttle.retry_after(client_subject(client))
        if wait is not None:
            raise PortalError(
                429,
                f"too many sign-in attempts from your address; try again in {wait} seconds",
                {"Retry-After": str(wait)},
            )

    async def begin_sign_in(self, request: Request, name: str) -> str:
        """Start signing in with provider *name*: the URL to send the browser to."""
        provider = self.provider(name)
        client = client_address(request)
        self._throttle_sign_in(client)
        self._attempt("sign-in", client_subject(client))  # every attempt counts
        state = secrets.token_urlsafe(32)
        login = PendingLogin(provider.name, secrets.token_urlsafe(48), secrets.token_urlsafe(24))
        try:
            url = await provider.authorize_url(
                self.redirect_uri(provider), state, login.verifier, login.nonce
            )
        except ProviderUnavailable as e:
            raise PortalError(502, str(e)) from None
        await self._db(PortalQueries.begin_login, state, login)
        # Binds the state to this browser: a callback URL made elsewhere is refused.
        self.set_cookie(request, self.login_cookie, state, LOGIN_TTL)
        return url

    async def finish_sign_in(self, request: Request, name: str) -> Session:
        """The provider sent the browser back: check it all, and open a session."""
        provider = self.provider(name)
        client = client_address(request)
        self._throttle_sign_in(client)
        args = request.args or {}
        state = (args.get(b"state") or [b""])[0].decode("ascii", "replace")
        expected = self._cookie(request, self.login_cookie)
        self.set_cookie(request, self.login_cookie, "", 0)
        pending = None
        if state and expected and _same(state, expected):
            pending = await self._db(PortalQueries.finish_login, state)
        if pending is None or pending.provider != provider.name:
            self._attempt("sign-in", client_subject(client))
            log.warn("sign-in with a forged, reused or expired state from {client}", client=client)
            raise PortalError(
                400,
                "this sign-in link is not valid: it was already used, has expired, or was not"
                " started in this browser; sign in again",
            )
        error = args.get(b"error")
        if error:
            reason = "".join(c for c in error[0].decode("ascii", "replace") if c.isprintable())
            raise PortalError(403, f"{provider.label} refused the sign-in ({reason[:80]})")
        code = (args.get(b"code") or [b""])[0].decode("ascii", "replace")
        if not code or len(code) > 2048:
            raise PortalError(400, f"{provider.label} sent no authorization code")
        try:
            identity = await provider.complete(
                code, self.redirect_uri(provider), pending.verifier, pending.nonce
            )
        except LoginRefused as e:
            log.warn("sign-in refused from {client}: {error}", client=client, error=str(e))
            raise PortalError(403, str(e)) from None
        except ProviderUnavailable as e:
            raise PortalError(502, str(e)) from None
        if not self.may_sign_in(identity):
            log.warn(
                "sign-in by {identity} from {client} refused: not allowed",
                identity=identity.identity,
                client=client,
            )
            raise PortalError(403, f"this portal is not open to {identity.identity}")
        if await self._db(PortalQueries.is_disabled, identity.identity):
            raise PortalError(403, f"the account {identity.identity} is disabled on this portal")
        session_id = secrets.token_urlsafe(32)
        session = await self._db(
            PortalQueries.create_session,
            session_id,
            identity.identity,
            identity.name,
            self.config.session_ttl,
        )
        self.set_cookie(
            request,
            self.session_cookie,
            f"{session_id}.{_sign(self._session_secret, session_id)}",
            self.config.session_ttl,
        )
        audit.info(
            "{identity} signed in from {client}",
            identity=identity.identity,
            client=client,
            audit="sign-in",
        )
        return session

    def may_sign_in(self, identity: Identity) -> bool:
        """``admins`` always; then anyone, or ``allowed_users`` and ``allowed_orgs`` members."""
        who = identity.identity
        if who in self._admins or not self.config.restricted:
            return True
        return who in self._allowed or bool(self._orgs & identity.orgs)

    async def sign_out(self, request: Request, visitor: Visitor) -> None:
        await self._db(PortalQueries.end_session, visitor.session.session_id)
        self.set_cookie(request, self.session_cookie, "", 0)
        audit.info(
            "{identity} signed out from {client}",
            identity=visitor.identity,
            client=visitor.client,
            audit="sign-out",
        )

    # --- keys -------------------------------------------------------------------------

    async def call_keys(self, f: Callable[..., Any], *args: Any) -> Any:
        try:
            return await f(*args)
        except QuotaExceeded:
            raise PortalError(
                409,
                f"you already have {self.config.max_keys_per_user} keys, the most allowed;"
                " delete one first",
            ) from None
        except KeyStoreError as e:
            log.error("key store: {error}", error=str(e))
            raise unavailable("the key store is unavailable") from e

    async def my_keys(self, visitor: Visitor) -> KeyList:
        keys: KeyList = await self.call_keys(self.keys.list, visitor.identity)
        return keys

    async def all_keys(self) -> KeyList:
        keys: KeyList = await self.call_keys(self.keys.list)
        return keys

    async def owned_key(self, visitor: Visitor, app_id: str, as_admin: bool = False) -> KeyInfo:
        """*visitor*'s key *app_id* (any key for an admin acting as one), else 404."""
        if APP_ID_RE.fullmatch(app_id):
            try:
                key = await self.keys.get(app_id)
            except KeyStoreError:
                pass
            else:
                if key.owner == visitor.identity or (as_admin and visitor.admin):
                    return key
        raise PortalError(404, "no such key")

    def repositories(self, values: Sequence[str]) -> list[str] | None:
        """Checked ``UPSTREAM/PREFIX`` limits; None when there are none."""
        cleaned = [v.strip() for v in values if v.strip()]
        if len(cleaned) > MAX_REPOSITORIES:
            raise PortalError(400, f"a key has at most {MAX_REPOSITORIES} repository limits")
        try:
            return [self._check_prefix(v) for v in cleaned] or None
        except ValueError as e:
            raise PortalError(400, str(e)) from None

    def _throttle_creation(self, visitor: Visitor) -> None:
        subject = f"portal user {visitor.identity}"
        wait = self.create_throttle.retry_after(subject)
        if wait is not None:
            raise PortalError(
                429,
                f"too many keys made in the last hour; try again in {wait} seconds",
                {"Retry-After": str(wait)},
            )
        self._attempt("create", subject)

    async def create_key(self, visitor: Visitor, name: str, repositories: Sequence[str]) -> NewKey:
        name = name.strip()
        if not name:
            raise PortalError(400, "give the key a name, such as laptop or ci")
        limits = self.repositories(repositories)
        self._throttle_creation(visitor)
        try:
            new: NewKey = await self.call_keys(
                self.keys.create, name, limits, visitor.identity, self.config.max_keys_per_user
            )
        except ValueError as e:
            raise PortalError(400, str(e)) from None
        self._audit("created", new.app_id, visitor, name=name)
        return new

    async def rotate_key(self, visitor: Visitor, app_id: str, as_admin: bool = False) -> NewKey:
        key = await self.owned_key(visitor, app_id, as_admin)
        if key.revoked:
            raise PortalError(409, "this key is deleted; create a new one instead")
        self._throttle_creation(visitor)
        new: NewKey = await self.call_keys(self.keys.rotate, key.app_id)
        self._audit("rotated", key.app_id, visitor, new=new.app_id, owner=key.owner)
        return new

    async def revoke_key(self, visitor: Visitor, app_id: str, as_admin: bool = False) -> KeyInfo:
        key = await self.owned_key(visitor, app_id, as_admin)
        if key.revoked:
            return key
        revoked: KeyInfo = await self.call_keys(self.keys.revoke, key.app_id)
        self._audit("revoked", key.app_id, visitor, owner=key.owner)
        return revoked

    def _audit(self, action: str, app_id: str, visitor: Visitor, **details: str) -> None:
        extra = "".join(f" {k}={v!r}" for k, v in sorted(details.items()))
        audit.info(
            "key {app_id} {action} by {actor} from {client}{extra}",
            app_id=app_id,
            action=action,
            actor=visitor.identity,
            client=visitor.client,
            extra=extra,
            audit=f"key-{action}",
        )

    # --- usage ------------------------------------------------------------------------

    async def usage(self, owner: str | None, days: int) -> dict[str, Any]:
        """Requests and bytes per UTC day for *owner*'s keys (everyone's if None)."""
        if not 1 <= days <= MAX_USAGE_DAYS:
            raise PortalError(400, f"days is from 1 to {MAX_USAGE_DAYS}")
        rows = await self.call_keys(self.keys.daily_usage, owner, days)
        today = int(self._reactor.seconds()) // DAY
        series = {
            day: {"requests": 0, "bytesServed": 0} for day in range(today - days + 1, today + 1)
        }
        by_key: dict[str, dict[str, int]] = {}
        for app_id, day, requests, nbytes in rows:
            if day in series:
                series[day]["requests"] += requests
                series[day]["bytesServed"] += nbytes
                total = by_key.setdefault(app_id, {"requests": 0, "bytesServed": 0})
                total["requests"] += requests
                total["bytesServed"] += nbytes
        return {
            "days": [
                {"date": datetime.fromtimestamp(day * DAY, UTC).strftime("%Y-%m-%d"), **counts}
                for day, counts in series.items()
            ],
            "keys": by_key,
        }

    # --- users ------------------------------------------------------------------------

    async def users(self) -> list[User]:
        users: list[User] = await self._db(PortalQueries.users)
        return users

    async def set_user_disabled(self, visitor: Visitor, identity: str, disabled: bool) -> Any:
        """An admin disables (revoking keys, ending sessions) or enables *identity*."""
        if not visitor.admin:
            raise PortalError(403, "this is for the portal's admins")
        if not IDENTITY_RE.fullmatch(identity):
            raise PortalError(404, "no such user")
        identity = normalize_identity(identity)
        if identity == visitor.identity:
            raise PortalError(409, "you cannot disable yourself")
        try:
            if disabled:
                return await disable_user(
                    self.store, self.keys, identity, visitor.identity, visitor.client
                )
            await self.store.run(PortalQueries.set_disabled, identity, False)
        except (KeyStoreError, PortalStoreError) as e:
            log.error("cannot change user {identity}: {error}", identity=identity, error=str(e))
            raise unavailable("the portal's databases are unavailable") from e
        audit.info(
            "user {identity} enabled by {actor} from {client}",
            identity=identity,
            actor=visitor.identity,
            client=visitor.client,
            audit="user-enabled",
        )
        return {"identity": identity, "disabled": False}


def key_json(key: KeyInfo) -> dict[str, Any]:
    """A key as the API shows it (``keys list --json``'s fields, ``repositories`` if any)."""
    data = key.to_json()
    if data["repositories"] is None:
        data["repositories"] = []
    return data
