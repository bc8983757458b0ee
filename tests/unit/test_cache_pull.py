"""The pull side consulting the cache, against a scripted upstream."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from dockmirror.cache import Cache
from dockmirror.config import CacheConfig
from dockmirror.errors import RegistryError
from dockmirror.metrics import Metrics
from dockmirror.pull import PullService
from dockmirror.routing import Route, Upstream
from dockmirror.upstream import SMALL_BODY_LIMIT, UpstreamError, read_small

from ._cache_support import UpstreamTransport, run_now, sha256

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LAYER = b"layer bytes" * 100
MANIFEST = json.dumps(
    {"layers": [{"digest": sha256(LAYER), "size": len(LAYER)}], "mediaType": DOCKER_MANIFEST}
).encode()


@dataclass
class Answer:
    code: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class ScriptedResponse:
    def __init__(self, method: str, answer: Answer) -> None:
        self.code = answer.code
        self.headers = Headers({k: [v] for k, v in answer.headers.items()})
        self.length = 0 if method == "HEAD" else len(answer.body)
        self.request = type("Request", (), {"method": method.encode()})()
        self._body = b"" if method == "HEAD" else answer.body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(UpstreamTransport())
        if self._body:
            protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class ScriptedUpstream:
    """Answers ``METHOD path`` from a table; None in the table: unreachable."""

    read_timeout = 60.0

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], Answer | None] = {}
        self.requests: list[tuple[str, str]] = []
        self.headers: list[dict[str, str] | None] = []

    async def request(self, route: Route, method: str, path: str, *args: Any) -> Any:
        self.requests.append((method, path))
        self.headers.append(args[0] if args else None)
        answer = self.answers[(method, path)]
        if answer is None:
            raise UpstreamError("connection refused")
        return ScriptedResponse(method, answer)

    def client(self, route: Route) -> ScriptedUpstream:
        """Reads (and their timeout) go through the route's client, here this."""
        return self

    async def read(self, response: Any, limit: int = SMALL_BODY_LIMIT) -> bytes:
        return await read_small(response, limit)


def manifest_answer(body: bytes = MANIFEST) -> Answer:
    return Answer(
        200, body, {"Content-Type": DOCKER_MANIFEST, "Docker-Content-Digest": sha256(body)}
    )


@pytest.fixture
def setup(tmp_path):
    clock = MemoryReactorClock()
    upstream = ScriptedUpstream()
    config = CacheConfig(directory=str(tmp_path), manifest_ttl=60)
    cache = Cache(config, clock, Metrics(), run=run_now, run_index=run_now)
    cache.startService()
    pull = PullService(upstream, clock, cache.metrics, cache)  # type: ignore[arg-type]
    route = Route(Upstream("hub", None, None, (), ()), "http://up", "library/x", "x")
    yield clock, upstream, cache, pull, route
    cache.stopService()


def get(d: Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def manifest(pull, route, head=False):
    return get(Deferred.fromCoroutine(pull.manifest(route, "v1", DOCKER_MANIFEST, head)))


@pytest.mark.parametrize("failure", [None, Answer(503), Answer(429, headers={"Retry-After": "9"})])
def test_an_expired_tag_is_served_stale_when_the_upstream_fails(setup, failure):
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    assert manifest(pull, route).headers["X-Cache"] == "MISS"
    clock.advance(60)
    upstream.answers[("HEAD", "manifests/v1")] = failure
    reply = manifest(pull, route)
    assert (reply.headers["X-Cache"], reply.body) == ("STALE", MANIFEST)
    assert cache.metrics.cache_stale._value.get() == 1


def test_without_serve_stale_the_failure_is_the_answer(setup):
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)
    cache.serve_stale = False
    clock.advance(60)
    upstream.answers[("HEAD", "manifests/v1")] = Answer(503)
    with pytest.raises(RegistryError) as info:
        manifest(pull, route)
    assert info.value.code == "UNAVAILABLE"


@pytest.mark.parametrize(
    "code, error", [(401, "DENIED"), (403, "DENIED"), (404, "MANIFEST_UNKNOWN")]
)
def test_a_refusal_is_never_served_stale(setup, code, error):
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)
    clock.advance(60)
    upstream.answers[("HEAD", "manifests/v1")] = Answer(code)
    with pytest.raises(RegistryError) as info:
        manifest(pull, route)
    assert info.value.code == error
    upstream.answers[("HEAD", "manifests/v1")] = manifest_answer()
    # A tag the upstream no longer has is forgotten, and fetched again.
    assert manifest(pull, route).headers["X-Cache"] == ("MISS" if code == 404 else "REVALIDATED")


def test_a_moved_tag_to_a_cached_manifest_needs_no_get(setup):
    clock, upstream, cache, pull, route = setup
    other = MANIFEST + b"\n"
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)
    upstream.answers[("GET", f"manifests/{sha256(other)}")] = manifest_answer(other)
    get(Deferred.fromCoroutine(pull.manifest(route, sha256(other), None, False)))
    clock.advance(60)
    upstream.answers[("HEAD", "manifests/v1")] = manifest_answer(other)
    reply = manifest(pull, route, head=True)
    assert reply.headers["X-Cache"] == "REVALIDATED"
    assert reply.headers["Docker-Content-Digest"] == sha256(other)
    assert upstream.requests.count(("GET", "manifests/v1")) == 1


def head_answer(data: bytes, size: int | None = None) -> Answer:
    return Answer(200, headers={"Content-Length": str(len(data) if size is None else size)})


def test_a_blob_a_cached_manifest_refers_to_is_proven_by_the_upstream(setup):
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)
    upstream.answers[("HEAD", f"blobs/{sha256(LAYER)}")] = head_answer(LAYER)
    upstream.answers[("GET", f"blobs/{sha256(LAYER)}")] = Answer(200, LAYER)
    reply = get(Deferred.fromCoroutine(pull.blob(route, sha256(LAYER), False, None)))
    assert (reply.status, reply.headers["X-Cache"]) == (200, "MISS")
    client = StringTransport()
    assert get(reply.stream.write_to(client)) == len(LAYER)
    assert client.value() == LAYER
    assert upstream.requests.count(("HEAD", f"blobs/{sha256(LAYER)}")) == 1
    assert cache.blobs.has(sha256(LAYER))
    # Through another repository of the same upstream, the upstream is asked first.
    elsewhere = Route(route.upstream, "http://up", "library/y", "y")
    upstream.answers[("HEAD", f"blobs/{sha256(LAYER)}")] = Answer(404)
    with pytest.raises(RegistryError) as info:
        get(Deferred.fromCoroutine(pull.blob(elsewhere, sha256(LAYER), False, None)))
    assert info.value.code == "BLOB_UNKNOWN"


def pass_through(setup, body: bytes) -> None:
    """The manifest cached, LAYER too large to cache, and *body* what the upstream sends of it."""
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)
    cache.max_layer_size = 10
    upstream.answers[("HEAD", f"blobs/{sha256(LAYER)}")] = head_answer(LAYER)
    upstream.answers[("GET", f"blobs/{sha256(LAYER)}")] = Answer(200, body)


def test_a_passed_through_blob_is_asked_for_one_range_at_most(setup):
    # Several ranges would come back as multipart/byteranges, which a blob reply
    # cannot carry; like a cached blob, the whole of it is served instead.
    clock, upstream, cache, pull, route = setup
    pass_through(setup, LAYER)
    reply = get(Deferred.fromCoroutine(pull.blob(route, sha256(LAYER), False, "bytes=0-1,5-6")))
    assert reply.status == 200
    assert upstream.headers[-1] is None


def test_a_passed_through_blob_longer_than_declared_is_refused(setup):
    clock, upstream, cache, pull, route = setup
    pass_through(setup, LAYER + b"more")
    with pytest.raises(RegistryError) as info:
        get(Deferred.fromCoroutine(pull.blob(route, sha256(LAYER), False, None)))
    assert info.value.status == 502
    # The size the HEAD announced turned out wrong: it is asked for again.
    assert cache.blobs.size_of(sha256(LAYER), "hub/library/x http://up") is None


@pytest.mark.parametrize("asked", [None, "bytes=0-1,5-6", "bytes=2-3"])
def test_a_passed_through_blob_answered_with_another_range_is_refused(setup, asked):
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)
    cache.max_layer_size = 10
    size = len(LAYER)
    upstream.answers[("HEAD", f"blobs/{sha256(LAYER)}")] = head_answer(LAYER)
    partial = Answer(206, LAYER[:2], {"Content-Range": f"bytes 0-1/{size}"})
    upstream.answers[("GET", f"blobs/{sha256(LAYER)}")] = partial
    with pytest.raises(RegistryError) as info:
        get(Deferred.fromCoroutine(pull.blob(route, sha256(LAYER), False, asked)))
    assert info.value.status == 502


def test_a_passed_through_range_is_the_one_asked_for(setup):
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)
    cache.max_layer_size = 10
    size = len(LAYER)
    upstream.answers[("HEAD", f"blobs/{sha256(LAYER)}")] = head_answer(LAYER)
    partial = Answer(206, LAYER[2:4], {"Content-Range": f"bytes 2-3/{size}"})
    upstream.answers[("GET", f"blobs/{sha256(LAYER)}")] = partial
    reply = get(Deferred.fromCoroutine(pull.blob(route, sha256(LAYER), False, "bytes=2-3")))
    assert (reply.status, reply.headers["Content-Range"]) == (206, f"bytes 2-3/{size}")


def test_a_transient_error_reading_a_cached_manifest_keeps_it(setup, monkeypatch):
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)

    def no_descriptors(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("dockmirror.cache.blobs.open", no_descriptors, raising=False)
    with pytest.raises(RegistryError) as info:
        manifest(pull, route)
    assert (info.value.status, info.value.code) == (503, "UNAVAILABLE")
    monkeypatch.undo()
    assert cache.manifests.has(sha256(MANIFEST))
    assert manifest(pull, route).headers["X-Cache"] == "HIT"
    assert upstream.requests.count(("GET", "manifests/v1")) == 1


@pytest.mark.parametrize("error", [errno.EMFILE, errno.ENFILE, errno.EIO, errno.EACCES])
def test_a_transient_error_opening_a_cached_blob_keeps_it(setup, monkeypatch, error):
    clock, upstream, cache, pull, route = setup
    digest = sha256(LAYER)
    Deferred.fromCoroutine(cache.blobs.put_small(digest, LAYER))
    cache.blobs.allow("hub/library/x http://up", digest)

    def failing_open(*args: Any, **kwargs: Any) -> Any:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr("dockmirror.cache.blobs.os.open", failing_open)
    with pytest.raises(RegistryError) as info:
        get(Deferred.fromCoroutine(pull.blob(route, digest, False, None)))
    assert (info.value.status, info.value.code) == (503, "UNAVAILABLE")
    monkeypatch.undo()
    assert cache.blobs.has(digest) and os.path.exists(cache.blobs.path(digest))
    assert upstream.requests == []


def test_a_blob_gone_from_the_disk_is_forgotten(setup):
    clock, upstream, cache, pull, route = setup
    digest = sha256(LAYER)
    Deferred.fromCoroutine(cache.blobs.put_small(digest, LAYER))
    cache.blobs.allow("hub/library/x http://up", digest)
    os.remove(cache.blobs.path(digest))
    upstream.answers[("GET", f"blobs/{digest}")] = Answer(200, LAYER)
    reply = get(Deferred.fromCoroutine(pull.blob(route, digest, False, None)))
    client = StringTransport()
    assert get(reply.stream.write_to(client)) == len(LAYER)
    assert client.value() == LAYER  # from the upstream, not cached
    assert not cache.blobs.has(digest)


def test_a_login_page_at_revalidation_is_an_upstream_failure(setup):
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)
    clock.advance(60)
    page = Answer(200, headers={"Content-Type": "text/html; charset=utf-8"})
    upstream.answers[("HEAD", "manifests/v1")] = page
    upstream.answers[("GET", "manifests/v1")] = Answer(200, b"<html>", page.headers)
    reply = manifest(pull, route)
    assert (reply.headers["X-Cache"], reply.body) == ("STALE", MANIFEST)
    assert upstream.requests.count(("GET", "manifests/v1")) == 1


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "text/html; charset=utf-8"}, {"Docker-Content-Digest": sha256(b"other")}],
)
def test_a_page_or_another_digest_is_no_proof(setup, headers):
    clock, upstream, cache, pull, route = setup
    digest = sha256(LAYER)
    Deferred.fromCoroutine(cache.blobs.put_small(digest, LAYER))
    upstream.answers[("HEAD", f"blobs/{digest}")] = Answer(200, headers=headers)
    with pytest.raises(RegistryError) as info:
        get(Deferred.fromCoroutine(pull.blob(route, digest, False, None)))
    assert info.value.status == 502
    Deferred.fromCoroutine(cache.blobs.put_small(sha256(MANIFEST), MANIFEST))
    cache.manifests._types[sha256(MANIFEST)] = DOCKER_MANIFEST
    upstream.answers[("HEAD", f"manifests/{sha256(MANIFEST)}")] = Answer(200, headers=headers)
    with pytest.raises(RegistryError) as info:
        get(Deferred.fromCoroutine(pull.manifest(route, sha256(MANIFEST), None, False)))
    assert info.value.status == 502
    origin = "hub/library/x http://up"
    assert not cache.blobs.allowed(origin, digest)
    assert not cache.blobs.allowed(origin, sha256(MANIFEST))


def test_an_upstream_content_type_is_logged_short_and_printable(setup):
    clock, upstream, cache, pull, route = setup
    page = {"Content-Type": "text/html\x1b[31m\u2028forged line" + "x" * 16_000}
    digest = sha256(LAYER)
    upstream.answers[("HEAD", f"blobs/{digest}")] = Answer(200, headers=page)
    upstream.answers[("GET", "manifests/v1")] = Answer(200, b"<html>", page)
    with capturedLogs() as events:
        with pytest.raises(RegistryError):
            get(Deferred.fromCoroutine(pull.blob(route, digest, False, None)))
        with pytest.raises(RegistryError):
            manifest(pull, route)
    pages = [formatEvent(e) for e in events if "text/html" in formatEvent(e)]
    assert len(pages) == 2
    assert all(len(text) < 400 and text.isprintable() for text in pages), pages


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("digest", ["sha256:\x1b[31mred\x07" + "x" * 5000, "md5:abc", "sha256:"])
def test_a_malformed_manifest_digest_from_the_upstream_is_refused_unrepeated(setup, digest, head):
    clock, upstream, cache, pull, route = setup
    answer = Answer(
        200, MANIFEST, {"Content-Type": DOCKER_MANIFEST, "Docker-Content-Digest": digest}
    )
    upstream.answers[("HEAD" if head else "GET", "manifests/v1")] = answer
    with pytest.raises(RegistryError) as info:
        manifest(pull, route, head)
    assert info.value.status == 502
    assert digest not in info.value.message and info.value.message.isprintable()
