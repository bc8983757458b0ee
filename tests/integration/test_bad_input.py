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


#: Malformed requests and the status each gets (without and with required auth).
#: Every answer is a registry-format error, except a TLS hello on the plain
#: listener, which is told so in plain text at once.
CASES = {
    "long-name": (get(b"/v2/" + b"a/" * 3000 + b"manifests/latest"), 400, 400),
    "no-reference": (get(b"/v2/a/manifests/"), 404, 404),
    "nul-tag": (get(b"/v2/a/manifests/%00"), 400, 400),
    "non-ascii-path": (get(b"/v2/\xff\xfe/manifests/latest"), 400, 400),
    "escaped-slash": (get(b"/v2/a%2Fb/manifests/latest"), 404, 401),
    "double-slashes": (get(b"//v2//a//manifests//latest"), 404, 404),
    "bad-hex-digest": (get(b"/v2/a/blobs/sha256:" + b"g" * 64), 400, 400),
    "garbage-range": (get(b"/v2/a/blobs/" + DIGEST.encode(), b"Range: bytes=garbage"), 404, 401),
    "huge-range": (
        get(b"/v2/a/blobs/" + DIGEST.encode(), b"Range: bytes=99999999999999999999-"),
        404,
        401,
    ),
    "control-accept": (get(b"/v2/a/manifests/latest", b"Accept: \x01\x02"), 404, 401),
    "long-ns": (get(b"/v2/a/manifests/latest?ns=" + b"x" * 5000), 404, 404),
    "non-utf8-ns": (get(b"/v2/a/manifests/latest?ns=%ff"), 404, 404),
    "negative-n": (get(b"/v2/a/tags/list?n=-1"), 400, 401),
    "word-n-long-last": (get(b"/v2/a/tags/list?n=abc&last=" + b"z" * 5000), 400, 401),
    "not-a-jwt": (
        get(b"/v2/a/manifests/latest", b"Authorization: Bearer not.a.jwt"),
        404,
        401,
    ),
    "bad-basic": (get(b"/v2/a/manifests/latest", b"Authorization: Basic !!!"), 404, 401),
    "long-basic": (get(b"/v2/", b"Authorization: Basic " + b"A" * 10000), 200, 401),
    "propfind": (get(b"/v2/a/manifests/latest", method=b"PROPFIND"), 405, 405),
    "options": (get(b"/v2/a/manifests/latest", method=b"OPTIONS"), 405, 405),
    "long-scope": (get(b"/docker-auth/token?scope=" + b"repository:" * 500), 401, 401),
    "empty-basic": (get(b"/docker-auth/token", b"Authorization: Basic Og=="), 401, 401),
    "huge-length": (
        get(b"/docker-auth/token", b"Content-Length: 10000000", method=b"POST"),
        413,
        413,
    ),
    "huge-chunked": (
        get(b"/docker-auth/token", b"Transfer-Encoding: chunked", method=b"POST")
        + b"%x\r\n" % (200_000,)
        + b"a" * 200_000
        + b"\r\n0\r\n\r\n",
        413,
        413,
    ),
    "dot-dot-root": (get(b"/../../../../etc/passwd"), 404, 404),
    "dot-dot-v2": (get(b"/v2/../../../../etc/passwd/blobs/" + DIGEST.encode()), 400, 400),
    "garbage": (b"GARBAGE\r\n\r\n", 400, 400),
    "http-9.9": (b"GET /v2/ HTTP/9.9\r\n\r\n", 400, 400),
    "long-header": (get(b"/v2/", b"X-Long: " + b"h" * 20000), 431, 431),
    "many-headers": (get(b"/v2/", *(b"X-%d: y" % i for i in range(600))), 400, 400),
    "long-url": (get(b"/v2/" + b"a" * 20000 + b"/manifests/latest"), 431, 431),
    "long-bearer": (get(b"/v2/", b"Authorization: Bearer " + b"e" * 15000), 200, 401),
    "many-scopes": (
        get(
            b"/docker-auth/token?" + b"&".join(b"scope=repository:r%d:pull" % i for i in range(600))
        ),
        400,
        400,
    ),
    "huge-n": (get(b"/v2/a/tags/list?n=" + b"9" * 4000), 400, 401),
    "superscript-n": (get(b"/v2/a/tags/list?n=%C2%B2"), 400, 401),
    "long-last": (get(b"/v2/a/tags/list?last=" + b"z" * 5000), 400, 401),
    "tls-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, 400),
    # A proxy in front may route or authorize by one, the mirror by the other.
    "two-hosts": (get(b"/v2/a/manifests/latest", b"Host: other.test"), 400, 400),
    "two-authorizations": (
        get(b"/v2/", b"Authorization: Basic Og==", b"Authorization: Bearer x.y.z"),
        400,
        400,
    ),
}


@pytest.fixture(scope="module", params=[False, True], ids=["open", "auth"])
def mirror(request, plain_registry, tmp_path_factory):
    from .conftest import Dockmirror, dockmirror_config
    from .registries import free_port

    workdir = tmp_path_factory.mktemp("bad-input")
    port = free_port()
    upstreams = {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}}
    config = dockmirror_config(workdir, port, upstreams, auth_required=request.param)
    server = Dockmirror(workdir, config, port)
    server.start()
    yield server
    server.stop()


def auth_required(mirror) -> bool:
    return bool(mirror.config["auth"]["required"])


@pytest.mark.parametrize("case", CASES)
def test_bad_request_is_refused_cleanly(mirror, case):
    data, open_status, auth_status = CASES[case]
    status, body = raw_request(mirror.port, data)
    assert status == (auth_status if auth_required(mirror) else open_status), body[:300]
    if case == "tls-hello":
        [error] = json.loads(body)["errors"]
        assert error["message"] == "This listener speaks plain HTTP, not TLS"
    if status != 200:
        [error] = json.loads(body)["errors"]
        assert set(error) == {"code", "message", "detail"}
    assert raw_request(mirror.port, get(b"/v2/"))[0] == (401 if auth_required(mirror) else 200)


def test_nothing_went_wrong_inside(mirror):
    for data, _, _ in CASES.values():
        raw_request(mirror.port, data)
    log = mirror.log_text()
    assert "Traceback" not in log
    assert "Unhandled" not in log
    assert mirror.running
