"""The JSON API under ``/portal/api/``, for the session's owner (and scripts using it).

Every answer is JSON; errors are ``{"error": "..."}`` with the status the
portal's contract names (401 signed out, 403 CSRF, 404 another user's key,
409 over quota, 429 throttled).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.web.server import Request

from dockmirror import jsontext
from dockmirror.portal.app import MAX_USAGE_DAYS, Portal, PortalError, Visitor, key_json
from dockmirror.portal.overview import (
    TrafficSampler,
    UpstreamProbe,
    cache_summary,
    hourly_series,
)

Overview = Callable[[], Awaitable[dict[str, Any]]]


def _body(request: Request) -> dict[str, Any]:
    """The JSON object a request sent."""
    if request.content is None:
        raise PortalError(400, "send a JSON object")
    try:
        value = jsontext.loads(request.content.read() or b"{}")
    except ValueError:
        raise PortalError(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise PortalError(400, "send a JSON object")
    return value


def _days(request: Request) -> int:
    raw = (request.args or {}).get(b"days", [b"30"])[0]
    try:
        return int(raw)
    except ValueError:
        raise PortalError(400, f"days is a number from 1 to {MAX_USAGE_DAYS}") from None


class PortalApi:
    """Answers ``/portal/api/<segments>``."""

    def __init__(self, portal: Portal, overview: Overview) -> None:
        self.portal = portal
        self.overview = overview

    async def serve(self, request: Request, path: list[str]) -> tuple[int, Any]:
        """The status and JSON answer for *path*; raises PortalError."""
        method = request.method.decode("ascii", "replace")
        visitor = await self.portal.visitor(request)
        if visitor is None:
            raise PortalError(401, "sign in first")
        if method not in ("GET", "HEAD"):
            # Bytes read as Latin-1: a token that is not UTF-8 is refused, not a 500.
            values = request.requestHeaders.getRawHeaders(b"x-csrf-token")
            self.portal.check_csrf(visitor, values[-1].decode("latin-1") if values else None)
        route = (method, *path)
        p = self.portal
        match route:
            case ("GET", "session"):
                return 200, {
                    "identity": visitor.identity,
                    "name": visitor.session.name,
                    "admin": visitor.admin,
                    "csrfToken": visitor.csrf_token,
                }
            case ("DELETE", "session"):
                await p.sign_out(request, visitor)
                return 200, {"signedOut": True}
            case ("GET", "keys"):
                return 200, {"keys": [key_json(k) for k in await p.my_keys(visitor)]}
            case ("POST", "keys"):
                body = _body(request)
                name, repositories = body.get("name"), body.get("repositories") or []
                if not isinstance(name, str):
                    raise PortalError(400, "name is a string")
                if not isinstance(repositories, list) or not all(
                    isinstance(r, str) for r in repositories
                ):
                    raise PortalError(400, "repositories is a list of UPSTREAM/PREFIX strings")
                new = await p.create_key(visitor, name, repositories)
                return 201, new.to_json()
            case ("POST", "keys", app_id, "rotate"):
                new = await p.rotate_key(visitor, app_id)
                return 200, {**new.to_json(), "replaces": app_id}
            case ("DELETE", "keys", app_id):
                return 200, key_json(await p.revoke_key(visitor, app_id))
            case ("GET", "usage"):
                return 200, await p.usage(visitor.identity, _days(request))
            case ("GET" | "POST" | "DELETE", "admin", *_):
                return await self._admin(request, visitor, route)
        raise PortalError(404, "no such API endpoint")

    async def _admin(
        self, request: Request, visitor: Visitor, route: tuple[str, ...]
    ) -> tuple[int, Any]:
        if not visitor.admin:
            raise PortalError(403, "this is for the portal's admins")
        p = self.portal
        match route:
            case ("GET", "admin", "overview"):
                return 200, await self.overview()
            case ("GET", "admin", "keys"):
                return 200, {"keys": [key_json(k) for k in await p.all_keys()]}
            case ("DELETE", "admin", "keys", app_id):
                return 200, key_json(await p.revoke_key(visitor, app_id, as_admin=True))
            case ("POST", "admin", "users", identity, ("disable" | "enable") as action):
                return 200, await p.set_user_disabled(visitor, identity, action == "disable")
        raise PortalError(404, "no such API endpoint")


def overview_source(
    portal: Portal,
    cache: Any,
    metrics: Any,
    probe: UpstreamProbe,
    sampler: TrafficSampler,
    reactor: Any,
) -> Overview:
    """What ``admin/overview`` answers, and the operator page shows."""

    async def overview() -> dict[str, Any]:
        await sampler.sample()  # this process's latest requests count too
        stats = await portal.call_keys(portal.keys.stats)
        traffic = await portal.call_keys(portal.keys.traffic, 24)
        return {
            "cache": cache_summary(cache.stats(), metrics),
            "upstreams": await probe.health(),
            "requests": hourly_series(traffic, reactor.seconds()),
            "keys": {k: stats[k] for k in ("keys", "active", "revoked", "requests", "bytesServed")},
            "users": [u.to_json() for u in await portal.users()],
        }

    return overview
