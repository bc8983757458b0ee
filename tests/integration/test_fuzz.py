"""Random HTTP requests against the real server, traced with strace.

A seeded generator builds requests from the pieces a registry client or an
attacker would send: paths with names, references and digests both valid and
broken, percent-escapes, raw bytes, odd methods, and headers (Host, Accept,
Range, If-Range, Authorization with real and forged credentials, bodies,
chunked framing, encodings).  The server runs under ``strace -f``.

Every answer must be below 500, and every error a registry-format JSON body;
the server must stay up with no traceback in its log; and it must open no
file outside its cache and state directories, nor connect anywhere but its
upstream, while the requests come in.  The seed is printed, and
``DOCKMIRROR_FUZZ_SEED`` replays a run; ``DOCKMIRROR_FUZZ_REQUESTS`` sets
its length.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from dockmirror import web

from .conftest import REPO_ROOT, Dockmirror, dockmirror_config
from .images import Image
from .keys import create_key
from .registries import LOOPBACK, Registry, free_port
from .test_pull import curl

pytestmark = pytest.mark.slow

REQUESTS = int(os.environ.get("DOCKMIRROR_FUZZ_REQUESTS", "3000"))
#: Seconds to wait for an answer.
ANSWER_TIMEOUT = 10.0
#: Wall-clock bound of the fuzzing phase, whatever the count.
TIME_LIMIT = 120.0
STRACE_CALLS = "openat,open,creat,openat2,rename,renameat,renameat2,unlink,unlinkat,connect"
MODULE_FILES = (".py", ".pyc", ".so", "__pycache__")
_SYSCALL = re.compile(
    r"^(?:\d+ +)?(?P<time>\d+\.\d+) (?P<call>\w+)\((?P<args>.*?)\) = (?P<result>-?\d+)"
)


@dataclass(frozen=True)
class Answer:
    request: bytes
    status: int
    headers: bytes
    body: bytes


class RequestMaker:
    """Random raw HTTP/1.1 requests, some well-formed, most not."""

    def __init__(self, rng: random.Random, image: Image, repo: str, creds: tuple[str, str]):
        self.rng = rng
        self.image = image
        self.repo = repo
        self.creds = creds
        self.digests = [image.digest, *(b.digest for b in image.blobs)]

    def pick(self, *choices: object) -> object:
        return self.rng.choice(choices)

    def junk(self, limit: int = 40) -> bytes:
        """Bytes of every kind, short."""
        size = self.rng.choice([0, 1, 2, 5, limit])
        alphabet = self.rng.choice(
            [
                b"abcxyz019-._",
                b"/.%:@?#&=+;, \t\\\"'",
                bytes(range(256)),
                "ä€😀/\u202e".encode(),
                b"%00%2f%2F%2e%2E%ff%zz%",
            ]
        )
        return bytes(self.rng.choice(alphabet) for _ in range(size))

    def name(self) -> bytes:
        return self.rng.choice(
            [
                self.repo.encode(),
                b"library/" + self.repo.rsplit("/", 1)[-1].encode(),
                b"docker.io/" + self.repo.encode(),
                b"private.test/" + self.repo.encode(),
                b"a",
                b"a/" * self.rng.choice([2, 60, 200]) + b"z",
                b"..",
                b"../../etc",
                b"%2e%2e/%2e%2e/etc",
                b"a%2fb",
                b"UPPER/case",
                self.junk(),
                b"x" * self.rng.choice([255, 256, 1000]),
            ]
        )

    def reference(self) -> bytes:
        digest = self.rng.choice(self.digests).encode()
        return self.rng.choice(
            [
                b"latest",
                self.image.tag.encode(),
                digest,
                digest[:-1],
                digest.upper(),
                b"sha512:" + b"0" * 128,
                b"md5:" + b"0" * 32,
                b"sha256:" + b"../" * 20,
                b"-tag",
                b"t" * 129,
                self.junk(),
            ]
        )

    def path(self) -> bytes:
        kind = self.rng.choice(["manifests", "blobs", "tags", "base", "other", "token"])
        if kind == "base":
            path = self.rng.choice([b"/v2/", b"/v2", b"//v2//", b"/v2/_catalog"])
        elif kind == "tags":
            path = b"/v2/" + self.name() + b"/tags/list"
        elif kind == "token":
            path = b"/docker-auth/token"
        elif kind == "other":
            path = self.rng.choice(
                [b"/", b"/metrics", b"/healthz", b"/../../etc/passwd", b"/v1/", b"/" + self.junk()]
            )
        else:
            path = b"/v2/" + self.name() + b"/" + kind.encode() + b"/" + self.reference()
        return path + self.query()

    def query(self) -> bytes:
        params = []
        for _ in range(self.rng.choice([0, 0, 1, 2, 4])):
            key = self.rng.choice(
                [b"ns", b"n", b"last", b"scope", b"service", b"grant_type", b"x", self.junk(8)]
            )
            value = self.rng.choice(
                [
                    b"docker.io",
                    b"private.test",
                    b"unknown.example",
                    b"%C2%B2",
                    b"9" * self.rng.choice([1, 5, 30, 4000]),
                    b"-1",
                    b"repository:" + self.repo.encode() + b":pull",
                    b"repository:a:pull repository:b:push",
                    b"password",
                    self.junk(),
                ]
            )
            params.append(key + b"=" + value)
        if not params:
            return b""
        return b"?" + b"&".join(params)

    def headers(self) -> list[bytes]:
        user, key = self.creds
        basic = base64.b64encode(f"{user}:{key}".encode())
        wrong = base64.b64encode(f"{user}:{key[:-1]}x".encode())
        choices = [
            b"Host: " + self.rng.choice([b"mirror.test", b"private.test", b"", self.junk()]),
            b"Accept: " + self.rng.choice([self.image.media_type.encode(), b"*/*", self.junk()]),
            b"Range: bytes=" + self.rng.choice([b"0-9", b"-5", b"5-3", b"1-2,4-5", self.junk()]),
            b"If-Range: " + self.rng.choice([b'"' + self.digests[1].encode() + b'"', self.junk()]),
            b"Authorization: Basic " + self.rng.choice([basic, wrong, b"!!", self.junk()]),
            b"Authorization: Bearer " + self.rng.choice([b"a.b.c", self.junk(200)]),
            b"Authorization: " + self.junk(),
            b"Accept-Encoding: " + self.rng.choice([b"gzip", b"br, deflate", self.junk()]),
            b"Content-Type: application/x-www-form-urlencoded",
            b"Connection: " + self.rng.choice([b"keep-alive", b"upgrade", self.junk()]),
            b"Expect: 100-continue",
            self.junk(12) + b": " + self.junk(),
            b"X-Forwarded-For: " + self.junk(),
        ]
        return [self.rng.choice(choices) for _ in range(self.rng.choice([0, 1, 2, 3, 6]))]

    def request(self) -> bytes:
        method = self.rng.choice(
            [b"GET"] * 6 + [b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"]
        )
        if self.rng.random() < 0.05:
            method = self.junk(8) or b"GET"
        version = b"HTTP/1.1" if self.rng.random() < 0.95 else self.junk(8)
        head = [method + b" " + self.path() + b" " + version, *self.headers()]
        body = b""
        framing = self.rng.random()
        if method == b"POST" and framing < 0.5:
            user, key = self.creds
            password = key if self.rng.random() < 0.5 else "wrong"
            body = f"grant_type=password&username={user}&password={password}".encode()
            body = body if self.rng.random() < 0.8 else self.junk(100)
            head.append(b"Content-Length: %d" % len(body))
        elif method == b"POST" and framing < 0.75:
            head.append(b"Transfer-Encoding: chunked")
            body = self.rng.choice(
                [b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"11170\r\n" + b"a" * 70000 + b"\r\n"]
            )
        head.append(b"Connection: close")
        return b"\r\n".join(head) + b"\r\n\r\n" + body


def send(port: int, data: bytes) -> Answer:
    """Send one request; read its answer (status 0: none, -1: none in time)."""
    method = data.split(b" ", 1)[0].decode("latin-1")
    with socket.create_connection((LOOPBACK, port), timeout=ANSWER_TIMEOUT) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server refused early; read what it said
        response = http.client.HTTPResponse(sock, method=method)
        try:
            response.begin()
            body = response.read()
        except TimeoutError:
            return Answer(data, -1, b"", b"")
        except (http.client.HTTPException, ConnectionResetError):
            return Answer(data, 0, b"", b"")
        return Answer(data, response.status, bytes(response.headers), body)


def problems(answer: Answer, layers: set[bytes]) -> list[str]:
    """What is wrong with one answer; ``layers``: the digests of non-manifest blobs."""
    found = []
    # distribution itself answers 500 to a manifest request by a layer's digest;
    # that is relayed as a 502 naming the upstream's status, and is no fault here.
    line = answer.request.split(b"\r\n", 1)[0]
    relayed = answer.status == 502 and (
        re.search(rb'"upstream \w+ is unavailable: answered 5', answer.body)
        or (line.startswith(b"HEAD ") and any(b"/manifests/" + d in line for d in layers))
    )
    if answer.status <= 0 or (answer.status >= 500 and not relayed):
        found.append(f"status {answer.status}")
    head_request = answer.request.startswith(b"HEAD ")
    if answer.status >= 400 and not head_request and answer.body:
        try:
            [error] = json.loads(answer.body)["errors"]
            if set(error) != {"code", "message", "detail"}:
                found.append("error without code, message and detail")
        except (ValueError, KeyError, TypeError):
            found.append(f"not a registry error body: {answer.body[:200]!r}")
    return found


@dataclass(frozen=True)
class Syscall:
    time: float
    call: str
    args: str
    result: int

    @property
    def path(self) -> str | None:
        m = re.search(r'"((?:[^"\\]|\\.)*)"', self.args)
        return m.group(1) if m else None


def syscalls(trace: Path) -> list[Syscall]:
    """The calls in strace's files ``trace.PID``, one per thread (so none is split)."""
    found = []
    text = "".join(p.read_text(errors="replace") for p in trace.parent.glob(f"{trace.name}.*"))
    for line in text.splitlines():
        m = _SYSCALL.match(line)
        if m:
            found.append(Syscall(float(m["time"]), m["call"], m["args"], int(m["result"])))
    return found


@pytest.fixture(scope="module")
def traced_mirror(
    htpasswd_registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Dockmirror, Path]]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("the fuzzing run needs strace (Debian package strace)")
    workdir = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    user, password = htpasswd_registry.creds or ("", "")
    upstream = {"url": htpasswd_registry.url, "username": user, "password": password}
    upstreams = {
        "hub": {"plugin": "dockerhub", "default": True, **upstream},
        "private": {"plugin": "registry", "aliases": ["private.test"], **upstream},
    }
    # Keys are required, but the fuzzed repository is open: requests without a
    # key reach the pull path too.
    config = dockmirror_config(
        workdir,
        port,
        upstreams,
        auth_required=True,
        extra={"auth": {"anonymous_repos": ["hub/fuzz"]}},
    )
    trace = workdir / "strace.txt"
    wrapper = [strace, "-ff", "-qq", "-ttt", "-e", f"trace={STRACE_CALLS}", "-o", str(trace)]
    mirror = Dockmirror(workdir, config, port)
    mirror.wrap(wrapper)
    mirror.start()
    try:
        yield mirror, trace
    finally:
        mirror.stop()


def test_fuzzing_the_server(traced_mirror, htpasswd_registry, seeded):
    mirror, trace = traced_mirror
    repo = "fuzz/app"
    image = seeded(htpasswd_registry, repo, "v1", layers=[5000])
    creds = create_key(mirror, "fuzz", "--repository", f"hub/{repo}")
    seed = int(os.environ.get("DOCKMIRROR_FUZZ_SEED", random.randrange(1 << 32)))
    print(f"DOCKMIRROR_FUZZ_SEED={seed}", file=sys.stderr)
    maker = RequestMaker(random.Random(seed), image, repo, creds)
    requests = [maker.request() for _ in range(REQUESTS)]
    log_mark = len(mirror.log_text())
    started = time.time()
    # A pull first: the trace must show the manifest going into the cache.
    status, _, body = curl(
        "-H", f"Accept: {image.media_type}", f"{mirror.url}/v2/{repo}/manifests/v1"
    )
    assert (status, body) == (200, image.manifest)
    deadline = time.monotonic() + TIME_LIMIT
    answers: list[Answer] = []
    with ThreadPoolExecutor(4) as pool:
        for answer in pool.map(
            lambda data: send(mirror.port, data) if time.monotonic() < deadline else None,
            requests,
        ):
            if answer is not None:
                answers.append(answer)
    ended = time.time()
    layers = {blob.digest.encode() for blob in image.blobs}
    bad = [(a.request[:300], p) for a in answers for p in problems(a, layers)]
    assert not bad, f"seed {seed}: {len(bad)} bad answers, e.g. {bad[:5]}"
    assert len(answers) >= min(REQUESTS, 500), "too few requests within the time limit"
    # Some requests were good ones: the run reached the pull path, not only the gates.
    assert {a.status for a in answers} >= {200, 400, 401, 404}
    assert mirror.running
    assert curl(f"{mirror.url}/v2/")[0] == 401
    log = mirror.log_text()[log_mark:]
    for sign in ("Traceback", "Unhandled", "unexpected error"):
        assert sign not in log, f"seed {seed}: {sign!r} in the log"
    # What the server touched while the requests came in: its own directories,
    # and Python's modules, read as they are first imported.
    allowed = [mirror.cache_dir, mirror.database_path.parent]
    modules = {Path(p) for p in (sys.prefix, sys.base_prefix, REPO_ROOT)}
    registry_address = f'inet_addr("{LOOPBACK}")'
    strays = []
    during = [call for call in syscalls(trace) if started <= call.time <= ended]
    cache = str(mirror.cache_dir)
    assert any((call.path or "").startswith(cache) for call in during), "the trace saw nothing"
    for call in during:
        if call.call == "connect":
            if registry_address not in call.args or f"htons({htpasswd_registry.port})" not in (
                call.args
            ):
                strays.append(f"connect({call.args})")
        elif call.path is not None and not any(
            Path(call.path).is_relative_to(directory) for directory in allowed
        ):
            module = call.call == "openat" and re.search(r"\bO_RDONLY\b", call.args)
            module = module and "O_CREAT" not in call.args and call.path.endswith(MODULE_FILES)
            if not (module and any(Path(call.path).is_relative_to(p) for p in modules)):
                strays.append(f"{call.call} {call.path} = {call.result}")
    assert not strays, f"seed {seed}: outside the cache and state directories: {strays[:20]}"


#: The label values a client may cause: fixed sets, whatever the requests.
ROUTES = set(web.ROUTES)
METHODS = {*web.METHODS, "other"}


def test_random_requests_leave_metric_series_bounded(traced_mirror):
    mirror, _ = traced_mirror
    rng = random.Random(4)
    for _ in range(200):
        method = rng.choice(
            [b"GET", b"BREW", b"X" + bytes(rng.choice(b"ABCDEFGH") for _ in range(5))]
        )
        path = b"/" + bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(12))
        send(mirror.port, method + b" " + path + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
    _, _, body = curl(f"{mirror.url}/metrics")
    labels = re.findall(
        r'^dockmirror_http_requests_total\{method="([^"]*)",route="([^"]*)",status="[0-9]+"\}',
        body.decode(),
        re.MULTILINE,
    )
    assert labels
    assert {method for method, _ in labels} <= METHODS
    assert {route for _, route in labels} <= ROUTES
