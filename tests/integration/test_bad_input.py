"""Malformed requests get clear 4xx answers; the server never errors and stays up."""

from __future__ import annotations

import json
import socket

import pytest

from .registries import LOOPBACK

DIGEST = "sha256:" + "0" * 64


def raw_request(port: int, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes; return the status and the body of the answer (0: none)."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    if not answer.startswith(b"HTTP/1."):
        return 0, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def get(path: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: mirror.test", b"Connection: close"]
    lines += headers
    return b"\r\n".join(lines) + b"\r\n\r\n"


BAD = [
    get(b"/v2/" + b"a/" * 3000 + b"manifests/latest"),
    get(b"/v2/a/manifests/"),
    get(b"/v2/a/manifests/%00"),
    get(b"/v2/\xff\xfe/manifests/latest"),
    get(b"/v2/a%2Fb/manifests/latest"),
    get(b"//v2//a//manifests//latest"),
    get(b"/v2/a/blobs/sha256:" + b"g" * 64),
    get(b"/v2/a/blobs/" + DIGEST.encode(), b"Range: bytes=garbage"),
    get(b"/v2/a/blobs/" + DIGEST.encode(), b"Range: bytes=99999999999999999999-"),
    get(b"/v2/a/manifests/latest", b"Accept: \x01\x02"),
    get(b"/v2/a/manifests/latest?ns=" + b"x" * 5000),
    get(b"/v2/a/manifests/latest?ns=%ff"),
    get(b"/v2/a/tags/list?n=-1"),
    get(b"/v2/a/tags/list?n=abc&last=" + b"z" * 5000),
    get(b"/v2/a/manifests/latest", b"Authorization: Bearer not.a.jwt"),
    get(b"/v2/a/manifests/latest", b"Authorization: Basic !!!"),
    get(b"/v2/", b"Authorization: Basic " + b"A" * 10000),
    get(b"/v2/a/manifests/latest", method=b"PROPFIND"),
    get(b"/v2/a/manifests/latest", method=b"OPTIONS"),
    get(b"/docker-auth/token?scope=" + b"repository:" * 500),
    get(b"/docker-auth/token", b"Authorization: Basic Og=="),
    get(b"/docker-auth/token", b"Content-Length: 10000000", method=b"POST"),
    get(b"/docker-auth/token", b"Transfer-Encoding: chunked", method=b"POST")
    + b"%x\r\n" % (200_000,)
    + b"a" * 200_000
    + b"\r\n0\r\n\r\n",
    get(b"/../../../../etc/passwd"),
    get(b"/v2/../../../../etc/passwd/blobs/" + DIGEST.encode()),
    b"GARBAGE\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\n\r\n",
    get(b"/v2/", b"X-Long: " + b"h" * 20000),
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
]


@pytest.fixture(scope="module", params=[True, False], ids=["auth", "open"])
def mirror(request, plain_registry, tmp_path_factory):
    from .conftest import Dockmirror, dockmirror_config
    from .registries import free_port

    workdir = tmp_path_factory.mktemp("bad-input")
    port = free_port()
    upstreams = {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}}
    server = Dockmirror(
        workdir, dockmirror_config(workdir, port, upstreams, auth_required=True), port
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("data", BAD, ids=range(len(BAD)))
def test_bad_request_is_refused_cleanly(mirror, data):
    status, body = raw_request(mirror.port, data)
    assert status < 500
    if status >= 400 and body.startswith(b"{"):
        assert set(json.loads(body)["errors"][0]) == {"code", "message", "detail"}
    assert raw_request(mirror.port, get(b"/v2/"))[0] in (200, 401)


def test_nothing_went_wrong_inside(mirror):
    for data in BAD:
        raw_request(mirror.port, data)
    log = mirror.log_text()
    assert "Traceback" not in log
    assert "Unhandled" not in log
    assert mirror.running
