"""``/portal``: the pages, the JSON API and the two static files, behind strict headers.

Every answer carries a Content-Security-Policy without inline script,
``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and
``Cache-Control: no-store``.  Errors are HTML pages in the portal and
``{"error": ...}`` in the API, never a traceback.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.template import Tag, flattenString

from dockmirror.portal import pages
from dockmirror.portal.api import Overview, PortalApi
from dockmirror.portal.app import Portal, PortalError, Visitor

log = Logger()

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_STATIC_TYPES = {
    "portal.css": "text/css; charset=utf-8",
    "portal.js": "text/javascript; charset=utf-8",
}
NOTICES = {"deleted": "The key is deleted.", "revoked": "The key is revoked."}


def _static_files() -> dict[str, bytes]:
    folder = resources.files("dockmirror.portal").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in _STATIC_TYPES}


def _form_value(request: Request, name: str) -> str:
    values = (request.args or {}).get(name.encode())
    return values[0].decode("utf-8", "replace") if values else ""


class PortalResource(Resource):
    """Everything under ``/portal``, served by one coroutine per request."""

    isLeaf = True

    def __init__(self, portal: Portal, overview: Overview) -> None:
        super().__init__()
        self.portal = portal
        self.overview = overview
        self.api = PortalApi(portal, overview)
        self.static = _static_files()

    def render(self, request: Request) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        d = Deferred.fromCoroutine(self._serve(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(self._crashed, request)
        return NOT_DONE_YET

    def _crashed(self, failure: Any, request: Request) -> None:
        if failure.check(CancelledError) or request.finished or request._disconnected:
            return
        log.failure(
            "portal error on {method} {path}",
            failure,
            method=request.method,
            path=request.path[:200],
        )
        if request.startedWriting:
            request.loseConnection()
        else:
            _send(request, 500, b"internal error", "text/plain; charset=utf-8")

    async def _serve(self, request: Request) -> None:
        try:
            path = [s.decode("utf-8") for s in request.postpath or []]
        except UnicodeDecodeError:
            path = ["?"]
        if not path:
            request.setResponseCode(301)
            request.setHeader("Location", "/portal/")
            request.finish()
            return
        if path[0] == "api":
            await self._api(request, path[1:])
        elif path[0] == "static" and len(path) == 2 and path[1] in self.static:
            request.setHeader("Cache-Control", "public, max-age=3600")
            _send(request, 200, self.static[path[1]], _STATIC_TYPES[path[1]])
        else:
            visitor = None
            try:
                visitor = await self.portal.visitor(request)
                await self._page(request, path, visitor)
            except CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any error gets a page, never a trace
                error = self._as_portal_error(request, e)
                for name, value in error.headers.items():
                    request.setHeader(name, value)
                page = pages.error_page(self.portal, error.status, error.message, visitor)
                await _html(request, page, error.status)

    async def _api(self, request: Request, path: list[str]) -> None:
        try:
            status, answer = await self.api.serve(request, path)
        except CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any error gets a JSON answer, never a trace
            error = self._as_portal_error(request, e)
            for name, value in error.headers.items():
                request.setHeader(name, value)
            status, answer = error.status, {"error": error.message}
        _send(request, status, json.dumps(answer).encode(), "application/json")

    @staticmethod
    def _as_portal_error(request: Request, error: Exception) -> PortalError:
        """*error* as the portal answers it; an unexpected one is logged and a 500."""
        if isinstance(error, PortalError) and not request.startedWriting:
            return error
        if request.startedWriting:
            raise error  # too late for an answer: _crashed cuts the connection
        log.failure(
            "portal error on {method} {path}",
            Failure(),
            method=request.method,
            path=request.path[:200],
        )
        return PortalError(500, "something went wrong on the server; it has been logged")

    async def _page(self, request: Request, path: list[str], visitor: Visitor | None) -> None:
        """The HTML side; *path* is below ``/portal/``."""
        p = self.portal
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        match (method, *path):
            case ("GET", "login", provider):
                _redirect(request, await p.begin_sign_in(request, provider), 302)
                return
            case ("GET", "login", provider, "callback"):
                # The access log shows the URI: not the authorization code in it.
                request.uri = request.path + b"?(code and state not logged)"
                await p.finish_sign_in(request, provider)
                _redirect(request, "/portal/")
                return
            case ("GET", ""):
                if visitor is None:
                    await _html(request, pages.sign_in_page(p))
                    return
        if visitor is None:
            if method == "GET":
                _redirect(request, "/portal/")
                return
            raise PortalError(401, "your session has ended; sign in again")
        if method == "POST":
            p.check_csrf(visitor, _form_value(request, "csrf_token"))
        match (method, *path):
            case ("GET", ""):
                notice = NOTICES.get(_form_value(request, "done"))
                keys = await p.my_keys(visitor)
                usage = await p.usage(visitor.identity, 30)
                await _html(request, pages.keys_page(p, visitor, keys, usage, notice))
            case ("POST", "logout"):
                await p.sign_out(request, visitor)
                _redirect(request, "/portal/")
            case ("POST", "keys"):
                repositories = _form_value(request, "repositories").replace(",", " ").split()
                new = await p.create_key(visitor, _form_value(request, "name"), repositories)
                await _html(request, pages.new_key_page(p, visitor, new, None), 201)
            case ("GET", "keys", app_id, ("rotate" | "delete") as action):
                key = await p.owned_key(visitor, app_id)
                await _html(request, pages.confirm_page(p, visitor, key, action))
            case ("POST", "keys", app_id, "rotate"):
                new = await p.rotate_key(visitor, app_id)
                await _html(request, pages.new_key_page(p, visitor, new, app_id))
            case ("POST", "keys", app_id, "delete"):
                await p.revoke_key(visitor, app_id)
                _redirect(request, "/portal/?done=deleted")
            case ("GET" | "POST", "admin", *_) if not visitor.admin:
                raise PortalError(403, "the operator view is for the portal's admins")
            case ("GET", "admin"):
                overview = await self.overview()
                keys = await p.all_keys()
                users = await p.users()
                await _html(request, pages.admin_page(p, visitor, overview, keys, users))
            case ("GET", "admin", "keys", app_id, "revoke"):
                key = await p.owned_key(visitor, app_id, as_admin=True)
                await _html(request, pages.confirm_page(p, visitor, key, "revoke", admin=True))
            case ("POST", "admin", "keys", app_id, "revoke"):
                await p.revoke_key(visitor, app_id, as_admin=True)
                _redirect(request, "/portal/admin")
            case ("GET", "admin", "users", identity, "disable"):
                await _html(request, pages.confirm_disable_page(p, visitor, identity))
            case ("POST", "admin", "users", identity, ("disable" | "enable") as action):
                await p.set_user_disabled(visitor, identity, action == "disable")
                _redirect(request, "/portal/admin")
            case _:
                raise PortalError(404, "there is no such page in the portal")


def _send(request: Request, status: int, body: bytes, content_type: str) -> None:
    request.setResponseCode(status)
    request.setHeader("Content-Type", content_type)
    request.setHeader("Content-Length", str(len(body)))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def _redirect(request: Request, location: str, status: int = 303) -> None:
    request.setResponseCode(status)
    request.setHeader("Location", location)
    request.setHeader("Content-Length", "0")
    request.finish()


async def _html(request: Request, page: Tag, status: int = 200) -> None:
    body = await flattenString(None, page)
    _send(request, status, b"<!DOCTYPE html>\n" + body, "text/html; charset=utf-8")
