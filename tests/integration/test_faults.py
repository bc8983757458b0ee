"""Faults, against the real server over verified TLS and real registries.

Misbehaving upstreams are a :class:`~.relay.Relay` in front of a real
``docker-registry``: it truncates, corrupts, hangs, or answers an error of
its own.  Whatever it does, a client gets a registry error or an aborted
transfer, never a whole ``200`` of wrong bytes, and the cache keeps nothing
of it.  No assertion is about time: timeouts are small in the mirror and
generous in the clients, so a slow machine only makes the tests slower.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .images import SkopeoError, pull
from .registries import LOOPBACK, wait_until
from .relay import Fault, Relay
from .test_pull import assert_pulled
from .tls import client_context

#: Seconds the mirror waits for a silent upstream in these tests ...
READ_TIMEOUT = 2
#: ... and seconds a test client waits for the mirror: far more.
CLIENT_TIMEOUT = 60


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Fetched:
    """One response as a client saw it."""

    status: int
    headers: dict[str, str]
    body: bytes
    #: The whole body the headers announced arrived.
    complete: bool
    #: The client gave up waiting (the mirror did not answer or cut in time).
    timed_out: bool = False

    def error_code(self) -> str:
        [entry] = json.loads(self.body)["errors"]
        assert set(entry) == {"code", "message", "detail"}
        return str(entry["code"])


def fetch(
    mirror: Any,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    source: str | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> Fetched:
    """Request ``path`` from the mirror over verified TLS, noting how the body ended."""
    connection = http.client.HTTPSConnection(
        LOOPBACK,
        mirror.port,
        context=client_context(),
        timeout=timeout,
        source_address=(source, 0) if source else None,
    )
    status, got, body = 0, {}, b""
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        status = response.status
        got = {k.lower(): v for k, v in response.getheaders()}
        try:
            body = response.read()
        except http.client.IncompleteRead as e:
            return Fetched(status, got, e.partial, complete=False)
        return Fetched(status, got, body, complete=True)
    except TimeoutError:
        return Fetched(status, got, body, complete=False, timed_out=True)
    except (ConnectionError, ssl.SSLError, http.client.HTTPException):
        return Fetched(status, got, body, complete=False)
    finally:
        connection.close()


def assert_no_wrong_bytes(result: Fetched, digest: str) -> None:
    """Never a complete 200 that is not the blob; the mirror itself ended the transfer."""
    assert not result.timed_out, "the mirror neither answered nor cut the transfer"
    if result.status == 200 and result.complete:
        assert sha256(result.body) == digest


def cached(mirror: Any) -> set[str]:
    """Digests with a file in the mirror's cache."""
    return {
        f"{p.parent.parent.name}:{p.name}"
        for p in (mirror.cache_dir / "blobs").glob("*/*/*")
        if p.is_file()
    }


def assert_cache_sound(mirror: Any) -> None:
    """Every cached file hashes to its name, and no unfinished fill is left."""
    for path in (mirror.cache_dir / "blobs").glob("*/*/*"):
        assert sha256(path.read_bytes()) == f"sha256:{path.name}", path
    wait_until(lambda: not list((mirror.cache_dir / "tmp").iterdir()), timeout=10)


@dataclass
class Answer(Fault):
    """Answer matching requests with ``status`` and ``headers`` instead of the upstream's."""

    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)


class AnsweringRelay(Relay):
    """A relay whose :class:`Answer` faults reply in the upstream's place."""

    def _respond(self, upstream: socket.socket, client: socket.socket, fault: Fault) -> None:
        if not isinstance(fault, Answer):
            super()._respond(upstream, client, fault)
            return
        body = json.dumps(
            {"errors": [{"code": "UNKNOWN", "message": "injected", "detail": None}]}
        ).encode()
        head = [f"HTTP/1.1 {fault.status} Injected", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in fault.headers.items()]
        head += [f"Content-Length: {len(body)}", "Connection: close"]
        client.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + body)


@pytest.fixture
def upstream(plain_registry: Any) -> Any:
    with AnsweringRelay(plain_registry.port) as relay:
        yield relay


def mirror_over(dockmirror: Any, relay: Relay, **cache: Any) -> Any:
    """A TLS mirror whose default upstream is *relay*, with short upstream timeouts."""
    upstreams = {
        "hub": {
            "plugin": "registry",
            "url": relay.url,
            "default": True,
            "connect_timeout": READ_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
        }
    }
    return dockmirror(upstreams, extra={"cache": cache} if cache else None, tls=True)


# --- the upstream misbehaves -------------------------------------------------------


BLOB_MODES = ["cached", "passthrough"]


def blob_mirror(dockmirror: Any, relay: Relay, mode: str) -> Any:
    """A mirror that fills blobs into its cache, or streams them through uncached."""
    return mirror_over(
        dockmirror, relay, **({"max_layer_size": "1KiB"} if mode != "cached" else {})
    )


@pytest.mark.parametrize("mode", BLOB_MODES)
@pytest.mark.parametrize(
    "fault",
    [
        {"cut_after": 100_000},
        {"flip": 150_000},
        {"flip": -1},
        {"stall_after": 0},
        {"stall_after": 100_000},
    ],
    ids=["truncated", "wrong-byte", "wrong-last-byte", "hangs-after-headers", "hangs-mid-body"],
)
def test_a_misbehaving_upstream_never_yields_a_wrong_blob(
    plain_registry, upstream, dockmirror, seeded, unique_repo, mode, fault
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[300_000])
    [layer] = image.platforms[0].layers
    mirror = blob_mirror(dockmirror, upstream, mode)
    # A negative offset counts from the end: -1 is the last byte.
    fault = {k: v + layer.size if v < 0 else v for k, v in fault.items()}
    upstream.faults.append(Fault(rf"^GET /v2/{unique_repo}/blobs/", **fault))
    path = f"/v2/{unique_repo}/blobs/{layer.digest}"

    result = fetch(mirror, path)
    assert_no_wrong_bytes(result, layer.digest)
    assert not result.complete or result.status != 200
    assert layer.digest not in cached(mirror)
    assert_cache_sound(mirror)

    upstream.faults.clear()
    again = fetch(mirror, path)
    assert (again.status, again.complete, sha256(again.body)) == (200, True, layer.digest)
    if mode == "cached":
        wait_until(lambda: layer.digest in cached(mirror), timeout=10)
    assert_cache_sound(mirror)


@pytest.mark.parametrize("reference", ["tag", "digest"])
@pytest.mark.parametrize(
    "fault",
    [{"flip": 40}, {"cut_after": 100}, {"stall_after": 0}, {"stall_after": 100}, {"hold": True}],
    ids=["wrong-byte", "truncated", "hangs-after-headers", "hangs-mid-body", "no-headers"],
)
def test_a_misbehaving_upstream_never_yields_a_wrong_manifest(
    plain_registry, upstream, dockmirror, seeded, unique_repo, reference, fault
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[1000])
    mirror = mirror_over(dockmirror, upstream)
    ref = "v1" if reference == "tag" else image.digest
    upstream.faults.append(Fault(rf"^(GET|HEAD) /v2/{unique_repo}/manifests/", **fault))
    if fault.get("hold"):
        upstream.hold()
    path = f"/v2/{unique_repo}/manifests/{ref}"
    accept = {"Accept": image.media_type}

    result = fetch(mirror, path, accept)
    assert not result.timed_out
    assert result.status in (502, 503) and result.error_code() == "UNAVAILABLE"
    assert image.digest not in cached(mirror)

    upstream.faults.clear()
    upstream.release()
    again = fetch(mirror, path, accept)
    assert (again.status, again.body) == (200, image.manifest)
    wait_until(lambda: image.digest in cached(mirror), timeout=10)
    assert_cache_sound(mirror)


@pytest.mark.parametrize(
    ("status", "sent", "expected_code", "expected_status", "retry_after"),
    [
        (429, "17", "TOOMANYREQUESTS", 429, "17"),
        (429, "86400", "TOOMANYREQUESTS", 429, "3600"),
        (429, "tomorrow", "TOOMANYREQUESTS", 429, "60"),
        (429, None, "TOOMANYREQUESTS", 429, "60"),
        (503, "5", "UNAVAILABLE", 503, "5"),
        (503, None, "UNAVAILABLE", 503, None),
        (500, None, "UNAVAILABLE", 502, None),
    ],
)
def test_upstream_errors_reach_the_client_as_registry_errors(
    plain_registry,
    upstream,
    dockmirror,
    seeded,
    unique_repo,
    status,
    sent,
    expected_code,
    expected_status,
    retry_after,
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[1000])
    [layer] = image.platforms[0].layers
    mirror = mirror_over(dockmirror, upstream)
    headers = {"Retry-After": sent} if sent is not None else {}
    upstream.faults.append(
        Answer(rf"^(GET|HEAD) /v2/{unique_repo}/", status=status, headers=headers)
    )
    for path in (f"/v2/{unique_repo}/manifests/v1", f"/v2/{unique_repo}/blobs/{layer.digest}"):
        result = fetch(mirror, path)
        assert (result.status, result.error_code()) == (expected_status, expected_code)
        assert result.headers.get("retry-after") == retry_after
    assert cached(mirror) == set()


@pytest.mark.parametrize("status", [500, 503, 429])
def test_an_expired_tag_is_served_stale_while_the_upstream_fails(
    plain_registry, upstream, dockmirror, seeded, unique_repo, status
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[1000])
    mirror = mirror_over(dockmirror, upstream, manifest_ttl=0)
    path = f"/v2/{unique_repo}/manifests/v1"
    accept = {"Accept": image.media_type}
    first = fetch(mirror, path, accept)
    assert (first.status, first.headers["x-cache"], first.body) == (200, "MISS", image.manifest)
    upstream.faults.append(
        Answer(rf"/v2/{unique_repo}/manifests/", status=status, headers={"Retry-After": "9"})
    )
    stale = fetch(mirror, path, accept)
    assert (stale.status, stale.headers["x-cache"], stale.body) == (200, "STALE", image.manifest)


def test_the_mirror_recovers_when_a_stopped_upstream_starts_again(
    registry_factory, dockmirror, seeded, unique_repo, tmp_path
):
    registry = registry_factory()
    before = seeded(registry, unique_repo, "before", layers=[20_000])
    after = seeded(registry, unique_repo, "after", layers=[30_000])
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": registry.url, "default": True}}, tls=True
    )
    pull(f"{mirror.host}/{unique_repo}:before", tmp_path / "a", cert_dir=mirror.cert_dir)

    registry.stop()
    down = fetch(mirror, f"/v2/{unique_repo}/manifests/after")
    assert (down.status, down.error_code()) == (503, "UNAVAILABLE")
    with pytest.raises(SkopeoError):
        pull(f"{mirror.host}/{unique_repo}:after", tmp_path / "b", cert_dir=mirror.cert_dir)
    pull(f"{mirror.host}/{unique_repo}:before", tmp_path / "c", cert_dir=mirror.cert_dir)
    assert_pulled(tmp_path / "c", before)

    registry.start()
    pull(f"{mirror.host}/{unique_repo}:after", tmp_path / "d", cert_dir=mirror.cert_dir)
    assert_pulled(tmp_path / "d", after)
    assert mirror.running


def test_timeouts_are_per_upstream(plain_registry, upstream, dockmirror, seeded, unique_repo):
    """A patient upstream keeps its long read_timeout while a hasty one times out."""
    image = seeded(plain_registry, unique_repo, "v1", layers=[1000])
    upstreams = {
        "hasty": {
            "plugin": "registry",
            "url": upstream.url,
            "default": True,
            "connect_timeout": READ_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
        },
        "patient": {
            "plugin": "registry",
            "url": upstream.url,
            "aliases": ["patient.test"],
            "read_timeout": 3600,
        },
    }
    mirror = dockmirror(upstreams, tls=True)
    upstream.faults.append(Fault(r"/manifests/", hold=True))
    upstream.hold()
    hasty = fetch(mirror, f"/v2/{unique_repo}/manifests/v1")
    assert (hasty.status, hasty.error_code()) == (503, "UNAVAILABLE")
    assert b"no response within" in hasty.body
    patient = fetch(
        mirror, f"/v2/patient.test/{unique_repo}/manifests/v1", timeout=3 * READ_TIMEOUT + 5
    )
    assert patient.timed_out
    upstream.release()
    del image


def peak_rss(pid: int) -> int:
    """The process's peak resident set size, in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def start_stalled_reader(mirror: Any, path: str) -> ssl.SSLSocket:
    """A client that asks for *path*, reads the first bytes, then stops reading."""
    raw = socket.create_connection((LOOPBACK, mirror.port), timeout=CLIENT_TIMEOUT)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock = client_context().wrap_socket(raw, server_hostname=LOOPBACK)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {mirror.host}\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


@pytest.mark.parametrize("mode", ["cold", "warm", "passthrough"])
def test_a_stalled_reader_holds_no_memory_and_slows_no_one(
    plain_registry, upstream, dockmirror, seeded, unique_repo, mode, tmp_path
):
    size = 48 << 20
    big = seeded(plain_registry, unique_repo, "big", layers=[size])
    other = seeded(plain_registry, unique_repo, "other", layers=[2 << 20, 1 << 20])
    [layer] = big.platforms[0].layers
    mirror = blob_mirror(dockmirror, upstream, "passthrough" if mode == "passthrough" else "cached")
    path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    if mode == "warm":
        assert fetch(mirror, path).complete
    baseline = peak_rss(mirror.pid)

    stalled = [start_stalled_reader(mirror, path) for _ in range(3)]
    try:
        fast = fetch(mirror, path)
        assert (fast.status, fast.complete, sha256(fast.body)) == (200, True, layer.digest)
        pull(f"{mirror.host}/{unique_repo}:other", tmp_path / "other", cert_dir=mirror.cert_dir)
        assert_pulled(tmp_path / "other", other)
        grown = peak_rss(mirror.pid) - baseline
        print(
            f"peak RSS grew by {grown >> 20} MiB with 3 stalled readers of a {size >> 20} MiB blob"
        )
        assert grown < size // 2
    finally:
        for sock in stalled:
            sock.close()
