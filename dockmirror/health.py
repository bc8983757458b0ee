"""``/healthz``: whether this mirror can serve, with the state of each part.

A part that fails makes the mirror unhealthy (503); a degraded part (the
cache full, so that blobs pass through uncached) is reported while the
mirror still answers 200.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.web.server import Request

from dockmirror.pull.access import Reply
from dockmirror.web import AsyncResource, send_body


@dataclass(frozen=True)
class Degraded:
    """A part that works in a reduced way, and why."""

    reason: str


Result = bool | str | Degraded
#: A named check answers True when healthy, a string saying what is wrong,
#: or :class:`Degraded`.
Check = Callable[[], "Awaitable[Result] | Result"]


class _Space(Protocol):
    def space(self) -> tuple[int, int] | None: ...


class _KeyBackend(Protocol):
    @property
    def shared(self) -> bool: ...


class _KeyStore(Protocol):
    write_error: str | None

    @property
    def backend(self) -> _KeyBackend: ...

    async def check(self) -> bool | str: ...


class _Listener(Protocol):
    listening: bool
    listen_error: str | None


def key_store(keys: _KeyStore) -> Callable[[], Awaitable[Result]]:
    """A check that the key store answers, degraded while usage cannot be written.

    A key store that every node shares (PostgreSQL) leaves a node degraded
    when it fails, not unhealthy: a load balancer that dropped every node
    would stop the pulls that tokens already issued still allow.
    """

    async def check() -> Result:
        result = await keys.check()
        if isinstance(result, str) and keys.backend.shared:
            return Degraded(f"{result}; logins fail, pulls with tokens already issued go on")
        if result is True and keys.write_error is not None:
            return Degraded(f"key usage is kept in memory: {keys.write_error}")
        return result

    return check


def notifications(listener: _Listener) -> Callable[[], Result]:
    """A check that the node hears the others, degraded while it does not."""

    def check() -> Result:
        if listener.listening:
            return True
        return Degraded(
            f"not hearing the other nodes ({listener.listen_error or 'starting'});"
            " revocations and purges reach this node by polling"
        )

    return check


def cache_space(store: _Space) -> Callable[[], Result]:
    """A check that the cache's file system has more than the margin fills leave free."""

    def check() -> Result:
        space = store.space()
        if space is None:
            return True
        free, margin = space
        if free < margin:
            return Degraded(
                f"{free} bytes free on the cache's file system, under cache.min_free"
                f" ({margin} bytes): blobs pass through uncached"
            )
        return True

    return check


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
        status = "ok"
        for name, check in self.checks.items():
            try:
                result = check()
                if isinstance(result, Awaitable):
                    result = await result
            except Exception as e:  # noqa: BLE001 - a failing check is a finding
                result = f"{type(e).__name__}: {e}"
            if isinstance(result, Degraded):
                results[name] = {"ok": True, "degraded": result.reason}
                status = "degraded" if status == "ok" else status
            elif result is True:
                results[name] = {"ok": True}
            else:
                results[name] = {"ok": False, "error": str(result)}
                status = "unhealthy"
        document: dict[str, Any] = {"status": status, "checks": results}
        for name, describe in self.info.items():
            document[name] = describe()
        body = json.dumps(document)
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        code = 503 if status == "unhealthy" else 200
        send_body(request, Reply(code, headers, body.encode()))
