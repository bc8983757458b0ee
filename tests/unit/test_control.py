"""The control socket answers only the server's user (and root)."""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.web.test.requesthelper import DummyRequest

from dockmirror.control import _WarmRun


class Handle:
    def __init__(self, uid: int) -> None:
        self.uid = uid

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_PEERCRED)
        return struct.pack("3i", 4242, self.uid, self.uid)


class Transport:
    def __init__(self, uid: int) -> None:
        self.handle = Handle(uid)

    def getHandle(self) -> Handle:
        return self.handle


class Result:
    def to_json(self) -> dict[str, Any]:
        return {"ok": True}


class Warmer:
    runs = 0

    def run(self) -> Any:
        self.runs += 1
        return succeed(Result())


def post(uid: int, warmer: Warmer | None) -> DummyRequest:
    request = DummyRequest([b""])
    request.method = b"POST"
    request.channel = type("Channel", (), {"transport": Transport(uid)})()
    body = _WarmRun(warmer).render_POST(request)  # type: ignore[arg-type]
    if isinstance(body, bytes):
        request.write(body)
    return request


@pytest.mark.parametrize("uid", [0, os.geteuid()])
def test_the_servers_user_and_root_run_a_round(uid: int) -> None:
    warmer = Warmer()
    request = post(uid, warmer)
    assert (request.responseCode or 200, warmer.runs) == (200, 1)
    assert json.loads(b"".join(request.written)) == {"ok": True}


def test_another_user_is_refused() -> None:
    warmer = Warmer()
    request = post(os.geteuid() + 1000, warmer)
    assert (request.responseCode, warmer.runs) == (403, 0)
    assert "only the server's user" in json.loads(b"".join(request.written))["error"]


def test_without_a_warm_list() -> None:
    request = post(os.geteuid(), None)
    assert request.responseCode == 409
