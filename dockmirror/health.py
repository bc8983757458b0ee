"""``/healthz``: whether this mirror can serve, with the state of each part."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.web.server import Request

from dockmirror.pull import Reply
from dockmirror.web import AsyncResource, send_body

#: A named check answers True when healthy, or a string saying what is wrong.
Check = Callable[[], "Awaitable[bool | str] | bool | str"]


def directory_writable(path: str) -> Callable[[], bool | str]:
    """A check that a file can be created and removed in *path*."""

    def check() -> bool | str:
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".healthz-"):
                pass
        except OSError as e:
            return f"{path}: {e.strerror}"
        return True

    return check


class HealthResource(AsyncResource):
    """The checks decide the status; *info* adds what is worth seeing (upstream endpoints).

    An upstream that is down does not make the mirror unhealthy: it still
    serves what it has cached.
    """

    def __init__(
        self, checks: dict[str, Check], info: dict[str, Callable[[], Any]] | None = None
    ) -> None:
        super().__init__()
        self.checks = checks
        self.info = info or {}

    async def serve(self, request: Request) -> None:
        results: dict[str, Any] = {}
        healthy = True
        for name, check in self.checks.items():
            try:
                result = check()
                if isinstance(result, Awaitable):
                    result = await result
            except Exception as e:  # noqa: BLE001 - a failing check is a finding
                result = f"{type(e).__name__}: {e}"
            ok = result is True
            healthy = healthy and ok
            results[name] = {"ok": ok} if ok else {"ok": False, "error": str(result)}
        document: dict[str, Any] = {"status": "ok" if healthy else "unhealthy", "checks": results}
        for name, describe in self.info.items():
            document[name] = describe()
        body = json.dumps(document)
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        send_body(request, Reply(200 if healthy else 503, headers, body.encode()))
