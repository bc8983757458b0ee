"""Faults, against the real server over verified TLS and real registries.

Misbehaving upstreams are a :class:`~.relay.Relay` in front of a real
``docker-registry``: it truncates, corrupts, hangs, or answers an error of
its own.  Whatever it does, a client gets a registry error or an aborted
transfer, never a whole ``200`` of wrong bytes, and the cache keeps nothing
of it.  No assertion is about time: timeouts are small in the mirror and
generous in the clients, so a slow machine only makes the tests slower.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from .images import SkopeoError, pull
from .keys import create_key, list_keys
from .registries import LOOPBACK, wait_until
from .relay import Fault, Relay
from .test_pull import assert_pulled
from .tls import client_context

MULTI = [("linux", "amd64"), ("linux", "arm64")]
#: Seconds the mirror waits for a silent upstream in these tests ...
READ_TIMEOUT = 2
#: ... and seconds a test client waits for the mirror: far more.
CLIENT_TIMEOUT = 45


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


# --- clients misbehave ---------------------------------------------------------------


class Slowloris:
    """Threads holding TLS connections from ``source`` that trickle a header byte a second.

    Each connection the server closes is counted by how it ended (408, 503,
    or a bare close) and opened again while the attack lasts.
    """

    def __init__(self, mirror: Any, source: str, count: int) -> None:
        self._mirror = mirror
        self._source = source
        self._threads = [threading.Thread(target=self._attack, daemon=True) for _ in range(count)]
        self._attacking = threading.Event()
        self._lock = threading.Lock()
        self.endings: Counter[str] = Counter()
        self.open = 0

    def __enter__(self) -> Slowloris:
        self._attacking.set()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop reconnecting; wait (generously) for the server to close what is open."""
        self._attacking.clear()
        deadline = time.monotonic() + CLIENT_TIMEOUT * 2
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> int:
        return sum(thread.is_alive() for thread in self._threads)

    def _ended(self, how: str) -> None:
        with self._lock:
            self.endings[how] += 1

    def _attack(self) -> None:
        while self._attacking.is_set():
            try:
                raw = socket.socket()
                raw.bind((self._source, 0))
                raw.settimeout(CLIENT_TIMEOUT)
                raw.connect((LOOPBACK, self._mirror.port))
                sock = client_context().wrap_socket(raw, server_hostname=LOOPBACK)
            except OSError:
                self._ended("connect failed")
                time.sleep(0.5)
                continue
            with self._lock:
                self.open += 1
            try:
                self._trickle(sock)
            finally:
                with self._lock:
                    self.open -= 1
                sock.close()

    def _trickle(self, sock: ssl.SSLSocket) -> None:
        pending = b"GET /v2/ HTTP/1.1\r\nHost: mirror.test\r\nX-Slow: " + b"a" * 10_000
        sock.settimeout(1.0)
        for byte in pending:
            try:
                data = sock.recv(200)
            except TimeoutError:
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    self._ended("closed")
                    return
                continue
            except OSError:
                self._ended("closed")
                return
            self._ended(data[:12].decode("latin-1") or "closed")
            return
        self._ended("never closed")


def test_slowloris_connections_do_not_starve_real_clients(
    plain_registry, dockmirror, seeded, unique_repo, tmp_path
):
    """Three hundred trickling connections from one address; real pulls from another.

    The server may open only 200 files: without the per-client limit the
    attack would take them all, and without the header timeout it would keep
    them for good.
    """
    image = seeded(plain_registry, unique_repo, "v1", layers=[100_000])
    server = {"header_timeout": 30, "max_connections_per_client": 40}
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}},
        extra={"server": server},
        tls=True,
    )
    subprocess.run(["prlimit", f"--pid={mirror.pid}", "--nofile=200:200"], check=True)
    with Slowloris(mirror, "127.0.0.2", 300) as attack:
        wait_until(lambda: sum(attack.endings.values()) >= 200, timeout=CLIENT_TIMEOUT)
        for n in range(3):
            base = fetch(mirror, "/v2/", timeout=20)
            assert (base.status, base.complete) == (200, True)
            pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / str(n), cert_dir=mirror.cert_dir)
            assert_pulled(tmp_path / str(n), image)
        print(f"slowloris connections ended: {dict(attack.endings)}")
        assert attack.endings["connect failed"] >= 100  # refused before the TLS handshake
        assert attack.open <= 40
        attack.stop()
        assert attack.alive == 0, "the server kept trickling connections open"
        print(f"slowloris connections ended: {dict(attack.endings)}")
        assert attack.endings["HTTP/1.1 408"] >= 1
        assert attack.endings["never closed"] == 0
    assert mirror.running


# --- the disk fills up -----------------------------------------------------------------


def in_namespace(mirror: Any, path: Path) -> Path:
    """*path* as the mirror's process sees it, in its own mount namespace."""
    return Path(f"/proc/{mirror.pid}/root") / path.relative_to("/")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_up(directory: Path, leave: int) -> Path:
    """Write a file in *directory* that leaves about *leave* bytes free (or none)."""
    filler = directory / f"filler-{uuid.uuid4().hex}"
    with filler.open("wb") as f:
        try:
            while (free := free_bytes(directory)) > leave:
                f.write(os.urandom(min(free - leave, 1 << 20)))
                f.flush()
        except OSError:
            pass  # the disk is full
    return filler


def health(mirror: Any) -> tuple[int, dict[str, Any]]:
    result = fetch(mirror, "/healthz")
    return result.status, json.loads(result.body)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_a_full_disk_degrades_the_cache_and_pulls_go_on(
    plain_registry, upstream, dockmirror, seeded, unique_repo, tmp_path
):
    small = seeded(plain_registry, unique_repo, "small", layers=[1 << 20])
    big = seeded(plain_registry, unique_repo, "big", layers=[12 << 20])
    [layer] = big.platforms[0].layers
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": upstream.url, "default": True}},
        tls=True,
        start=False,
    )
    mirror.cache_dir.mkdir(parents=True)
    mirror.run_under(
        *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
        'mount -t tmpfs -o size=64m dockmirror-test "$0" && exec "$@"',
        str(mirror.cache_dir),
    )
    mirror.start()
    cache = in_namespace(mirror, mirror.cache_dir)
    margin = int(0.05 * (64 << 20))  # min_free's default on a 64 MiB file system

    def committed() -> set[str]:
        return {f"{p.parent.parent.name}:{p.name}" for p in (cache / "blobs").glob("*/*/*")}

    # Nearly full: pulls work, uncached, and /healthz says why.
    filler = fill_up(cache, margin // 2)
    status, body = health(mirror)
    assert (status, body["status"]) == (200, "degraded")
    assert "under cache.min_free" in body["checks"]["cache_space"]["degraded"]
    pull(f"{mirror.host}/{unique_repo}:big", tmp_path / "full", cert_dir=mirror.cert_dir)
    assert_pulled(tmp_path / "full", big)
    assert committed() == set()

    # Full in the middle of a fill: that client's transfer is cut, nothing is committed.
    filler.unlink()
    upstream.faults.append(Fault(rf"^GET /v2/{unique_repo}/blobs/{layer.digest}", rate=2 << 20))
    with ThreadPoolExecutor(1) as pool:
        cut = pool.submit(fetch, mirror, f"/v2/{unique_repo}/blobs/{layer.digest}")
        wait_until(lambda: any(p.stat().st_size > 1 << 20 for p in (cache / "tmp").iterdir()), 30)
        filler = fill_up(cache, 0)
        result = cut.result()
    assert_no_wrong_bytes(result, layer.digest)
    assert not result.complete
    wait_until(lambda: not list((cache / "tmp").iterdir()), timeout=10)
    assert layer.digest not in committed()
    assert "cannot write to the cache" in mirror.log_text()

    # Space returns: caching resumes without a restart.
    filler.unlink()
    upstream.faults.clear()
    assert health(mirror)[1]["status"] == "ok"
    pull(f"{mirror.host}/{unique_repo}:small", tmp_path / "small", cert_dir=mirror.cert_dir)
    assert_pulled(tmp_path / "small", small)
    wait_until(lambda: {b.digest for b in small.blobs} <= committed(), timeout=10)
    again = fetch(mirror, f"/v2/{unique_repo}/blobs/{small.platforms[0].layers[0].digest}")
    assert (again.status, again.headers["x-cache"]) == (200, "HIT")
    for path in (cache / "blobs").glob("*/*/*"):
        assert sha256(path.read_bytes()) == f"sha256:{path.name}"


# --- the key store is unavailable ------------------------------------------------------


def basic(app_id: str, api_key: str) -> str:
    return base64.b64encode(f"{app_id}:{api_key}".encode()).decode()


def login(mirror: Any, app_id: str, api_key: str) -> Fetched:
    return fetch(
        mirror,
        f"/docker-auth/token?service={mirror.host}&scope=repository:x:pull",
        {"Authorization": f"Basic {basic(app_id, api_key)}"},
    )


def test_an_unusable_key_store_is_reported_without_a_crash_loop(plain_registry, dockmirror):
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}},
        auth_required=True,
        tls=True,
        start=False,
    )
    mirror.database_path.write_bytes(b"not a database " * 100)
    mirror.start()
    status, body = health(mirror)
    assert status == 503
    assert "not a database" in body["checks"]["key_store"]["error"]
    refused = login(mirror, "app_x", "sk_y")
    assert (refused.status, refused.error_code()) == (503, "UNAVAILABLE")
    assert mirror.running

    mirror.database_path.unlink()
    app_id, api_key = create_key(mirror)
    wait_until(lambda: health(mirror)[0] == 200, timeout=CLIENT_TIMEOUT)
    assert login(mirror, app_id, api_key).status == 200
    assert "the key store is unavailable" in mirror.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only mount needs root")
def test_a_read_only_key_store_keeps_keys_working(plain_registry, dockmirror, tmp_path):
    state = tmp_path / "state"
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}},
        auth_required=True,
        tls=True,
        extra={"auth": {"database": str(state / "keys.sqlite")}},
    )
    app_id, api_key = create_key(mirror)
    mirror.stop()
    mirror.run_under(
        *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
        'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"',
        str(state),
    )
    mirror.start()
    # Keys keep working; usage cannot be written, is kept, and /healthz says so.
    status, body = health(mirror)
    assert (status, body["status"]) == (200, "degraded")
    assert "read-only file system" in body["checks"]["key_store"]["degraded"]
    assert login(mirror, app_id, api_key).status == 200
    fetch(mirror, "/v2/", {"Authorization": "Basic " + basic(app_id, api_key)})
    wait_until(lambda: "cannot write key usage" in mirror.log_text(), CLIENT_TIMEOUT)
    assert "readonly" in health(mirror)[1]["checks"]["key_store"]["degraded"]
    assert mirror.running
    mirror.stop()
    mirror.run_under()
    mirror.start()
    assert login(mirror, app_id, api_key).status == 200
    assert app_id in list_keys(mirror)


# --- the process dies ------------------------------------------------------------------


def strace_kill(syscalls: str, when: int, path: Path | None = None) -> tuple[str, ...]:
    """An strace wrapper that SIGKILLs the server at its *when*-th *syscalls* (on *path*)."""
    only = ("-P", str(path)) if path is not None else ()
    return (
        *("strace", "-f", "-qq", "-o", "/dev/null", *only),
        *("-e", f"trace={syscalls}", "-e", f"inject={syscalls}:signal=KILL:when={when}"),
    )


def index_rows(mirror: Any) -> dict[str, int]:
    with sqlite3.connect(mirror.cache_dir / "index.sqlite") as db:
        return dict(db.execute("SELECT digest, size FROM blobs").fetchall())


def blob_files(mirror: Any) -> dict[str, int]:
    return {
        f"{p.parent.parent.name}:{p.name}": p.stat().st_size
        for p in (mirror.cache_dir / "blobs").glob("*/*/*")
    }


def filled(directory: Path, size: int) -> bool:
    """Whether a file in *directory* holds *size* bytes or more (files come and go)."""
    for path in directory.iterdir():
        try:
            if path.stat().st_size >= size:
                return True
        except FileNotFoundError:
            continue
    return False


def port_free(port: int) -> bool:
    """Whether the server's port can be listened on again (its killed owner is gone)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


KILL_POINTS = ("data", "rename", "index write", "key-usage flush")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to kill at a syscall")
def test_kill_9_at_any_point_loses_no_key_and_serves_no_partial_blob(
    plain_registry, upstream, dockmirror, seeded, unique_repo
):
    """Kill -9 during a fill, right at its rename, in an index write or a key-usage flush.

    strace injects the SIGKILL at the chosen system call, so the crash lands
    exactly there; "data" kills a fill at a random point, where the upstream
    stalls until the kill (a fill that ran on would be renamed before a busy
    machine let the test see it there, and then not killed at all).  After
    each restart: every blob served is whole, every key still works, and the
    index, once written out, accounts for exactly the files on disk.
    """
    rng = random.Random(os.environ.get("DOCKMIRROR_TEST_SEED", uuid.uuid4().hex))
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": upstream.url, "default": True}},
        auth_required=True,
        tls=True,
    )
    upstream.faults.append(Fault(r"^GET /v2/.*/blobs/", rate=4 << 20))
    keys = [create_key(mirror, "before")]
    images = []
    points = [point for point in KILL_POINTS for _ in range(3)]
    rng.shuffle(points)
    for round_, point in enumerate(points):
        image = seeded(plain_registry, unique_repo, f"r{round_}", layers=[3 << 20, 64 << 10])
        images.append(image)
        keys.append(create_key(mirror, f"round {round_}"))
        auth = {"Authorization": "Basic " + basic(*rng.choice(keys))}
        layer = image.platforms[0].layers[0]
        # Renames are blob installs (strace counts per thread: the first, in any thread);
        # each database is written by one thread.
        wrapper = {
            "data": (),
            "rename": strace_kill("rename,renameat,renameat2", 1),
            "index write": strace_kill(
                "pwrite64", rng.randint(1, 3), mirror.cache_dir / "index.sqlite-wal"
            ),
            "key-usage flush": strace_kill(
                "pwrite64", rng.randint(1, 2), mirror.database_path.with_name("keys.sqlite-wal")
            ),
        }[point]
        print(f"round {round_}: to be killed at {point}")
        if point == "data":
            cut = rng.randint(64 << 10, layer.size - (64 << 10))
            stall = Fault(rf"^GET /v2/.*/blobs/{layer.digest} ", stall_after=cut, times=1)
            upstream.faults.insert(0, stall)
        mirror.stop()
        mirror.run_under(*wrapper)
        mirror.start()
        with ThreadPoolExecutor(4) as pool:
            for blob in image.blobs:
                pool.submit(fetch, mirror, f"/v2/{unique_repo}/blobs/{blob.digest}", auth)
            if point == "data":
                wait_until(partial(filled, mirror.cache_dir / "tmp", cut), CLIENT_TIMEOUT)
                mirror.kill9()
            else:
                wait_until(lambda: not mirror.running, timeout=CLIENT_TIMEOUT)
        mirror.kill9()  # reap the killed process group
        wait_until(partial(port_free, mirror.port), CLIENT_TIMEOUT)

        mirror.run_under()
        mirror.start()
        assert_cache_sound(mirror)
        for app_id, api_key in keys:
            assert login(mirror, app_id, api_key).status == 200, app_id
        assert set(dict(keys)) <= set(list_keys(mirror))
        for earlier in images:
            for blob in earlier.blobs:
                served = fetch(mirror, f"/v2/{unique_repo}/blobs/{blob.digest}", auth)
                assert (served.status, served.complete) == (200, True)
                assert sha256(served.body) == blob.digest
        mirror.stop()
        assert index_rows(mirror) == blob_files(mirror)
        mirror.start()


# --- load ----------------------------------------------------------------------------


@pytest.mark.slow
def test_48_concurrent_pulls_cold_and_warm_over_tls_with_keys(
    plain_registry, upstream, dockmirror, seeded, unique_repo, tmp_path
):
    """48 skopeo pulls at once of 6 images, cold then warm: all whole, each blob fetched once."""
    images = [
        seeded(plain_registry, unique_repo, "multi", layers=[2 << 20, 256 << 10], platforms=MULTI),
        *(
            seeded(plain_registry, unique_repo, f"v{n}", layers=[(n + 1) << 20, 100 << 10])
            for n in range(4)
        ),
        seeded(plain_registry, unique_repo, "docker", layers=[3 << 20], docker_media_types=True),
    ]
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": upstream.url, "default": True}},
        auth_required=True,
        tls=True,
    )
    keys = [create_key(mirror, f"load {n}") for n in range(4)]
    blobs = {blob.digest for image in images for blob in image.blobs}
    for phase in ("cold", "warm"):
        before = upstream.count(r"^GET /v2/.*/blobs/")
        jobs = [(n, images[n % len(images)], keys[n % len(keys)]) for n in range(48)]
        (tmp_path / phase).mkdir()

        def one(job: tuple[int, Any, tuple[str, str]], phase: str = phase) -> None:
            n, image, creds = job
            dest = tmp_path / phase / str(n)
            pull(f"{mirror.host}/{unique_repo}:{image.tag}", dest, creds, cert_dir=mirror.cert_dir)
            assert_pulled(dest, image)

        with ThreadPoolExecutor(48) as pool:
            failures = [f.exception() for f in [pool.submit(one, job) for job in jobs]]
        assert [f for f in failures if f is not None] == []
        fetched = upstream.count(r"^GET /v2/.*/blobs/") - before
        print(
            f"{phase}: 48 pulls of 6 images ({len(blobs)} blobs), {fetched} blob fetches"
            f" and {upstream.count('/manifests/')} manifest requests upstream so far,"
            f" peak RSS {peak_rss(mirror.pid) >> 20} MiB"
        )
        assert fetched == (len(blobs) if phase == "cold" else 0)
