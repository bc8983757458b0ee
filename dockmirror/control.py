"""The control socket: requests from ``dockmirror-admin`` to the running server.

An HTTP API on a UNIX socket in the state directory (``control.sock``),
made mode 0600: only the server's user (and root) can connect, and a peer
of any other uid is refused all the same (``SO_PEERCRED``).  A CLI that
opened the cache itself would find it locked by the server; this asks the
server to do the work, and waits for the answer.

- ``POST /warm/run``: run a warm round (or join the running one); the
  answer is its result as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from dockmirror.warm import RoundResult, Warmer

log = Logger()

CONTROL_SOCKET = "control.sock"


def _peer_uid(request: Request) -> int | None:
    """The uid of the process at the other end of the socket."""
    transport: Any = request.channel.transport if request.channel is not None else None
    try:
        handle = transport.getHandle()
        size = struct.calcsize("3i")
        credentials = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
    except (AttributeError, OSError):
        return None
    _, uid, _ = struct.unpack("3i", credentials)
    return int(uid)


def _answer(request: Request, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader("Content-Type", "application/json")
    return json.dumps(body).encode()


class _WarmRun(Resource):
    isLeaf = True

    def __init__(self, warmer: Warmer | None) -> None:
        super().__init__()
        self._warmer = warmer

    def render_POST(self, request: Request) -> Any:
        uid = _peer_uid(request)
        if uid not in (0, os.geteuid()):
            log.warn("control socket: refused a peer of uid {uid}", uid=uid)
            return _answer(request, 403, {"error": "only the server's user may control it"})
        if self._warmer is None:
            return _answer(request, 409, {"error": "no [warm] images are configured"})
        log.info("control socket: warm round asked for")
        d = self._warmer.run()
        gone = request.notifyFinish()
        gone.addErrback(lambda _: d.cancel())

        def done(result: RoundResult) -> None:
            request.write(_answer(request, 200, result.to_json()))
            request.finish()

        def failed(failure: Failure) -> None:
            if gone.called:
                failure.trap(CancelledError)
                return
            log.failure("warm round failed", failure)
            request.write(_answer(request, 500, {"error": failure.getErrorMessage()}))
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET


def control_service(reactor: Any, state_directory: Path, warmer: Warmer | None) -> Any:
    """The listener on ``control.sock`` in *state_directory*."""
    root = Resource()
    warm = Resource()
    warm.putChild(b"run", _WarmRun(warmer))
    root.putChild(b"warm", warm)
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    endpoint = UNIXServerEndpoint(
        reactor, str(state_directory / CONTROL_SOCKET), mode=0o600, wantPID=True
    )
    return StreamServerEndpointService(endpoint, site)
