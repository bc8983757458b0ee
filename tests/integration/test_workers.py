"""``[server] workers = N``: the supervisor and its workers, end to end.

Which worker answered a request is read from the workers' own metric files
(``prometheus_client``'s multiprocess directory, one file per process), so a
test can make requests until every worker has served some.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import shutil
import signal
import socket
import socketserver
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.mmap_dict import MmapedDict

from dockmirror.cache.parts import plan

from .clients import ServerTLS, make_server_tls, tls_endpoint
from .conftest import Dockmirror, DockmirrorFactory, toml_document
from .images import Blob, Image, Layer
from .keys import admin, create_key
from .registries import LOOPBACK, Registry, free_port, wait_until
from .test_auth import basic, token_for
from .test_cache import assert_cache_sound, cached_blobs, sha256
from .test_pull import curl
from .test_warm import warm_run
from .upstream_servers import Relay

WORKERS = 2


class SlowUpstream:
    """A loopback TCP relay to a registry that sends its answers at *rate* bytes/s.

    It makes fills last long enough for other requests to arrive during them.
    """

    def __init__(self, registry: Registry, rate: int = 8 << 20) -> None:
        self.target = (LOOPBACK, int(registry.url.rsplit(":", 1)[1]))
        self.rate = rate
        self.server = socketserver.ThreadingTCPServer((LOOPBACK, 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[socketserver.BaseRequestHandler]:
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with socket.create_connection(relay.target) as upstream:
                    threading.Thread(
                        target=_pump, args=(self.request, upstream, None), daemon=True
                    ).start()
                    _pump(upstream, self.request, relay.rate)

        return Handler


def _pump(source: socket.socket, sink: socket.socket, rate: int | None) -> None:
    chunk = 64 << 10
    try:
        while data := source.recv(chunk):
            sink.sendall(data)
            if rate is not None:
                time.sleep(len(data) / rate)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def slow_upstream(registry_factory) -> Iterator[tuple[Registry, SlowUpstream]]:
    registry = registry_factory()
    relay = SlowUpstream(registry)
    yield registry, relay
    relay.close()


def start_workers(
    dockmirror: DockmirrorFactory,
    registry: Registry | SlowUpstream,
    workers: int = WORKERS,
    *,
    auth_required: bool = False,
    **cache: object,
) -> Dockmirror:
    """A mirror of *registry* with *workers* workers, each of them serving."""
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}},
        auth_required=auth_required,
        extra={"server": {"workers": workers}, **({"cache": cache} if cache else {})},
    )
    wait_until(lambda: len(serving_workers(mirror)) == workers, timeout=30, interval=0.1)
    return mirror


def worker_pids(mirror: Dockmirror) -> list[int]:
    """The supervisor's child processes."""
    children = Path(f"/proc/{mirror.pid}/task/{mirror.pid}/children")
    try:
        return [int(pid) for pid in children.read_text().split()]
    except FileNotFoundError:
        return []


def serving_workers(mirror: Dockmirror) -> list[int]:
    """Workers that adopted their listeners (they log it as they start)."""
    started = mirror.log_text().count(f"MirrorSite (PlainHTTPFactory) starting on {mirror.port}")
    return worker_pids(mirror) if started >= len(worker_pids(mirror)) else []


def metrics_directory(pid: int) -> Path:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [entry] = [e for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(entry.partition(b"=")[2].decode())


def counted_by_worker(mirror: Dockmirror, name: str, label: str) -> dict[int, float]:
    """The counter *name* with *label* (``"key": "value"``) of each live worker, from its file."""
    counts = {}
    for pid in worker_pids(mirror):
        path = metrics_directory(pid) / f"counter_{pid}.db"
        total = 0.0
        if path.exists():
            for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
                if f'"{name}"' in key and label in key:
                    total += value
        counts[pid] = total
    return counts


def requests_by_worker(mirror: Dockmirror, route: str) -> dict[int, float]:
    """Requests of *route* each live worker answered."""
    return counted_by_worker(mirror, "dockmirror_http_requests_total", f'"route": "{route}"')


def first_layer(mirror: Dockmirror, repository: str, image: Image) -> tuple[Layer, str]:
    """The first layer of *image*, and its URL at *mirror*."""
    layer = image.platforms[0].layers[0]
    return layer, f"{mirror.url}/v2/{repository}/blobs/{layer.digest}"


def until_every_worker_answered(
    mirror: Dockmirror, route: str, request: Callable[[], None], limit: int = 200
) -> int:
    """Repeat *request* (a new connection each time) until every worker answered one."""
    before = requests_by_worker(mirror, route)
    for count in range(1, limit + 1):
        request()
        now = requests_by_worker(mirror, route)
        if all(now[pid] > before.get(pid, 0) for pid in now):
            return count
    raise AssertionError(f"not every worker answered within {limit} requests: {now}")


def test_one_upstream_fetch_per_digest_across_workers(
    registry_factory, dockmirror, seeded, unique_repo
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[24 << 20])
    mirror = start_workers(dockmirror, registry)
    layer, url = first_layer(mirror, unique_repo, image)
    manifest_url = f"{mirror.url}/v2/{unique_repo}/manifests/v1"
    with ThreadPoolExecutor(16) as pool:
        manifests = list(pool.map(lambda _: curl(manifest_url), range(16)))
        results = list(pool.map(lambda _: curl(url), range(16)))
    assert {(status, body) for status, _, body in manifests} == {(200, image.manifest)}
    manifest_gets = registry.count_requests("GET", f"{unique_repo}/manifests/v1")
    print(f"upstream manifest GETs for 16 cold clients over {WORKERS} workers: {manifest_gets}")
    assert manifest_gets == 1  # Docker Hub counts each against the pull limit
    for status, _, body in results:
        assert status == 200
        assert sha256(body) == layer.digest
    assert registry.count_requests("GET", f"/blobs/{layer.digest}") == 1
    assert cached_blobs(mirror)[layer.digest] == layer.size
    # Every worker serves it from the cache now, without asking for it again.
    until_every_worker_answered(mirror, "blob", lambda: curl(url))
    assert registry.count_requests("GET", f"/blobs/{layer.digest}") == 1
    assert_cache_sound(mirror)


def test_one_manifest_get_for_the_whole_service(registry_factory, dockmirror, seeded, unique_repo):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1")

    def slow_manifests(request: BaseHTTPRequestHandler) -> bool:
        if "/manifests/" in request.path:
            time.sleep(1)  # every worker gets clients while the first fetch lasts
        return False  # then passed on

    upstream = Relay(registry.url, {unique_repo: slow_manifests})
    upstream.start()
    try:
        mirror = start_workers(dockmirror, upstream)
        url = f"{mirror.url}/v2/{unique_repo}/manifests/v1"
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: curl(url), range(16)))
        assert {(status, body) for status, _, body in results} == {(200, image.manifest)}
        assert all(requests_by_worker(mirror, "manifest").values())

        def manifest_gets() -> int:
            return sum(r.method == "GET" and "/manifests/" in r.path for r in upstream.received)

        assert manifest_gets() == 1
        # A worker that did not wait for it heard of it too: no second GET.
        until_every_worker_answered(mirror, "manifest", lambda: curl(url))
        assert manifest_gets() == 1
    finally:
        upstream.stop()


def test_downloads_at_once_spread_evenly_over_the_workers(
    plain_registry, dockmirror, seeded, unique_repo
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[32 << 20])
    mirror = start_workers(dockmirror, plain_registry)
    layer, url = first_layer(mirror, unique_repo, image)
    assert curl(url)[0] == 200  # cached from now on
    answered = 1
    for _ in range(2):
        wait_until(lambda n=answered: sum(requests_by_worker(mirror, "blob").values()) == n)
        before = requests_by_worker(mirror, "blob")
        with ThreadPoolExecutor(8) as pool:  # 8 downloads of 4 s each, all at once
            results = list(pool.map(lambda _: curl("--limit-rate", "8M", url), range(8)))
        answered += 8
        wait_until(lambda n=answered: sum(requests_by_worker(mirror, "blob").values()) == n)
        after = requests_by_worker(mirror, "blob")
        assert {(status, sha256(body)) for status, _, body in results} == {(200, layer.digest)}
        assert sorted(after[pid] - before.get(pid, 0) for pid in after) == [4, 4]


def test_a_fill_in_one_worker_is_followed_by_the_others(
    slow_upstream, dockmirror, seeded, unique_repo
):
    registry, relay = slow_upstream
    image = seeded(registry, unique_repo, "v1", layers=[64 << 20])
    mirror = start_workers(dockmirror, relay)
    layer, url = first_layer(mirror, unique_repo, image)
    with ThreadPoolExecutor(30) as pool:
        clients = [pool.submit(curl, url)]
        wait_until(lambda: any(p.stat().st_size for p in (mirror.cache_dir / "tmp").iterdir()))
        # New connections while the fill runs, until one reached the other worker.
        while "following the fill of" not in mirror.log_text() and len(clients) < 30:
            clients.append(pool.submit(curl, url))
            time.sleep(0.2)
        results = [client.result() for client in clients]
    assert "following the fill of" in mirror.log_text()
    assert {(status, sha256(body)) for status, _, body in results} == {(200, layer.digest)}
    # One fill, spread over the default 4 connections: the other worker reads its prefix.
    assert mirror.log_text().count(f"filling {layer.digest}") == 1
    ranges = len(plan(layer.size, 4))
    assert 1 < registry.count_requests("GET", f"/blobs/{layer.digest}") <= ranges


def test_the_quota_holds_with_fills_in_two_workers(
    registry_factory, dockmirror, seeded, unique_repo
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[6 << 20] * 4)
    quota = 15 << 20
    mirror = start_workers(dockmirror, registry, max_size="15MiB")
    urls = [
        f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}" for layer in image.platforms[0].layers
    ]
    peak = 0
    done = False

    def watch() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, bytes_on_disk(mirror))
            time.sleep(0.005)

    def fetch(url: str) -> bytes:
        out = subprocess.run(
            ["curl", "-s", "-S", "--noproxy", "*", "--limit-rate", "4M", url],
            capture_output=True,
            check=True,
        )
        return out.stdout

    with ThreadPoolExecutor(9) as pool:
        watcher = pool.submit(watch)
        try:
            bodies = list(pool.map(fetch, urls * 2))
        finally:
            done = True
        watcher.result()
    digests = [layer.digest for layer in image.platforms[0].layers] * 2
    assert [sha256(body) for body in bodies] == digests
    assert all(requests_by_worker(mirror, "blob").values())  # both workers filled or read
    print(f"peak bytes on disk: {peak} of a {quota}-byte quota")
    assert peak <= quota
    assert sum(cached_blobs(mirror).values()) <= quota
    assert_cache_sound(mirror)


def bytes_on_disk(mirror: Dockmirror) -> int:
    """The bytes of the blob files and fills on disk, all at one moment.

    One look at the blobs and then at the fills is not one moment: a blob
    evicted and a fill started in between are both counted.  Two looks that
    agree are (no file comes back within milliseconds).
    """
    previous = None
    while True:
        files: dict[Path, int] = {}
        for path in [
            *(mirror.cache_dir / "blobs").glob("*/*/*"),
            *(mirror.cache_dir / "tmp").iterdir(),
        ]:
            with contextlib.suppress(FileNotFoundError):
                files[path] = path.stat().st_size
        if files == previous:
            return sum(files.values())
        previous = files


def holder_of(mirror: Dockmirror, directory: Path) -> int | None:
    """The worker with a file of *directory* open for writing."""
    for pid in worker_pids(mirror):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except FileNotFoundError:
                continue
            if target.startswith(str(directory) + "/"):
                return pid
    return None


def kill_the_filler(mirror: Dockmirror, url: str, size: int) -> int:
    """Start a pull of *url* and kill -9 the worker filling it midway; its pid."""
    client = subprocess.Popen(
        ["curl", "-s", "--noproxy", "*", "-o", "-", url], stdout=subprocess.PIPE
    )
    temp = mirror.cache_dir / "tmp"
    try:
        wait_until(lambda: any(p.stat().st_size for p in temp.iterdir()), interval=0.01)
        filler = holder_of(mirror, temp)
        assert filler is not None
        os.kill(filler, signal.SIGKILL)
    finally:
        body, _ = client.communicate(timeout=60)
    assert client.returncode != 0 and len(body) < size
    wait_until(
        lambda: filler not in worker_pids(mirror) and len(serving_workers(mirror)) == WORKERS,
        timeout=30,
    )
    return filler


def test_kill_9_of_a_filling_worker(slow_upstream, dockmirror, seeded, unique_repo):
    registry, relay = slow_upstream
    image = seeded(registry, unique_repo, "v1", layers=[64 << 20])
    mirror = start_workers(dockmirror, relay)
    layer, url = first_layer(mirror, unique_repo, image)
    kill_the_filler(mirror, url, layer.size)  # its client is cut short, never "complete"
    assert layer.digest not in cached_blobs(mirror)
    # The supervisor started a worker in its place.
    assert "worker 0 (pid" in mirror.log_text() and "restarting worker" in mirror.log_text()
    status, _, body = curl(url)
    assert status == 200 and sha256(body) == layer.digest
    assert cached_blobs(mirror)[layer.digest] == layer.size
    assert_cache_sound(mirror)


def indexed(mirror: Dockmirror) -> list[str]:
    """The blobs in the cache's index, least recently used first."""
    with contextlib.closing(sqlite3.connect(mirror.cache_dir / "index.sqlite")) as db:
        return [d for (d,) in db.execute("SELECT digest FROM blobs ORDER BY used, digest")]


def test_a_killed_fillers_reservation_is_given_back_to_the_quota(
    slow_upstream, dockmirror, seeded, unique_repo
):
    registry, relay = slow_upstream
    image = seeded(registry, unique_repo, "v1", layers=[10 << 20, 11 << 20])
    mirror = start_workers(dockmirror, relay, max_size="15MiB")
    first, second = image.platforms[0].layers
    blobs = f"{mirror.url}/v2/{unique_repo}/blobs"
    kill_the_filler(mirror, f"{blobs}/{first.digest}", first.size)
    # Had the dead worker's 10 MiB stayed reserved, 11 more would not fit in 15.
    status, _, body = curl(f"{blobs}/{second.digest}")
    assert status == 200 and sha256(body) == second.digest
    wait_until(lambda: cached_blobs(mirror) == {second.digest: second.size})
    # And the first, fetched again, takes the second's place, whichever worker fetches it.
    wait_until(lambda: indexed(mirror) == [second.digest])
    status, _, body = curl(f"{blobs}/{first.digest}")
    assert status == 200 and sha256(body) == first.digest
    wait_until(lambda: cached_blobs(mirror) == {first.digest: first.size})
    assert_cache_sound(mirror)


def connection_to_each_worker(mirror: Dockmirror) -> dict[int, http.client.HTTPConnection]:
    """A keep-alive connection to each worker (a connection stays with the worker it reached)."""
    found: dict[int, http.client.HTTPConnection] = {}
    for _ in range(100):
        connection = http.client.HTTPConnection(LOOPBACK, mirror.port, timeout=30)
        before = requests_by_worker(mirror, "base")
        assert get(connection, "/v2/")[0] == 200
        after = requests_by_worker(mirror, "base")
        answered = [pid for pid in after if after[pid] > before.get(pid, 0)]
        if len(answered) != 1 or answered[0] in found:  # another request came meanwhile
            connection.close()
        else:
            found[answered[0]] = connection
        if len(found) == WORKERS:
            return found
    raise AssertionError(f"no connection reached every worker: {list(found)}")


def get(connection: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read()


def room_for_two_of_three(
    registry_factory: Any, dockmirror: DockmirrorFactory, seeded: Any, repo: str
) -> tuple[Dockmirror, list[Blob], list[http.client.HTTPConnection], Callable[..., None]]:
    """Two workers whose cache has room for two of three layers, a connection to
    each, and how to pull a layer through one."""
    registry = registry_factory()
    image = seeded(registry, repo, "v1", layers=[6 << 20] * 3)
    mirror = start_workers(dockmirror, registry, max_size="15MiB")

    def pull(connection: http.client.HTTPConnection, layer: Blob, settle: float = 0) -> None:
        status, body = get(connection, f"/v2/{repo}/blobs/{layer.digest}")
        assert status == 200 and sha256(body) == layer.digest
        time.sleep(settle)

    connections = list(connection_to_each_worker(mirror).values())
    return mirror, list(image.platforms[0].layers), connections, pull


def test_eviction_counts_the_uses_of_every_worker(
    registry_factory, dockmirror, seeded, unique_repo
):
    mirror, (old, other, new), (first, second), pull = room_for_two_of_three(
        registry_factory, dockmirror, seeded, unique_repo
    )
    settle = 1.5  # each use is in the index
    pull(first, old, settle)
    pull(first, other, settle)
    # In the first worker's own view, the old blob is the least recently used ...
    pull(second, old, settle)
    # ... but the second worker used it since: the other one goes.
    pull(first, new, settle)
    wait_until(lambda: set(cached_blobs(mirror)) == {old.digest, new.digest})
    assert_cache_sound(mirror)


def test_eviction_counts_a_use_in_another_worker_before_it_reaches_the_index(
    registry_factory, dockmirror, seeded, unique_repo
):
    mirror, (old, other, new), (first, second), pull = room_for_two_of_three(
        registry_factory, dockmirror, seeded, unique_repo
    )
    pull(first, old)
    pull(second, old)  # the second worker knows it: its next use is one more index write
    pull(first, other)
    time.sleep(1.5)  # in the index: the old blob is the least recently used
    pull(second, old)  # that write waits up to a second
    pull(first, new)
    wait_until(lambda: set(cached_blobs(mirror)) == {old.digest, new.digest})
    assert_cache_sound(mirror)


def lock_as_evicting(cache_dir: Path, digest: str) -> int:
    """Take the locks a worker evicting *digest* holds (its claim and its pin, exclusive).

    The byte offsets are those of :mod:`dockmirror.coordination`; closing the
    descriptor frees them.  Waits for the readers and the filler to let go.
    """
    offset = int(digest.partition(":")[2][:15], 16)
    fd = os.open(cache_dir / "fills.lock", os.O_RDWR)

    def locked() -> bool:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, (1 << 61) + offset)
        except OSError:
            return False
        return True

    wait_until(locked, timeout=10, interval=0.05)
    return fd


def test_a_blob_another_worker_is_evicting_is_not_read_from_the_cache(
    registry_factory, dockmirror, seeded, unique_repo
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 20])
    mirror = start_workers(dockmirror, registry)
    layer, url = first_layer(mirror, unique_repo, image)
    status, _, body = curl(url)
    assert status == 200
    wait_until(lambda: layer.digest in cached_blobs(mirror))  # committed after its last byte
    # A worker of this cache is evicting it: a reader coming now must not count on it.
    fd = lock_as_evicting(mirror.cache_dir, layer.digest)
    try:

        def fetch() -> None:
            out = subprocess.run(
                ["curl", "-sS", "-f", "--noproxy", "*", "--max-time", "10", url],
                capture_output=True,
                check=True,
            )
            assert sha256(out.stdout) == layer.digest

        until_every_worker_answered(mirror, "blob", fetch, limit=50)
    finally:
        os.close(fd)
    status, _, body = curl(url)
    assert status == 200 and sha256(body) == layer.digest
    assert_cache_sound(mirror)


def test_a_crash_writing_the_blobs_kept_leaves_nothing_behind(plain_registry, dockmirror):
    mirror = start_workers(dockmirror, plain_registry)
    left = mirror.cache_dir / f".kept.{uuid.uuid4().hex}"
    left.write_text("sha256:" + "0" * 64 + "\n")  # a write cut by a crash, long ago
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    writing = mirror.cache_dir / f".kept.{uuid.uuid4().hex}"
    writing.write_text("")  # another worker writing it now
    os.kill(worker_pids(mirror)[0], signal.SIGKILL)
    wait_until(lambda: not left.exists(), timeout=30)  # when its successor starts
    wait_until(lambda: mirror.log_text().count("left by a crash") == 1)
    assert writing.exists()


def test_warm_images_are_kept_from_eviction_by_every_worker(
    registry_factory, dockmirror, seeded, unique_repo
):
    registry = registry_factory()
    kept = seeded(registry, f"{unique_repo}-kept", "v1", layers=[300_000])
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": registry.url, "default": True}},
        extra={
            "server": {"workers": WORKERS},
            "warm": {"images": [f"hub/{unique_repo}-kept:v1"], "interval": "1h"},
            "cache": {"max_size": "1MiB"},
        },
    )
    wait_until(lambda: len(serving_workers(mirror)) == WORKERS, timeout=30, interval=0.1)
    assert warm_run(mirror)["ok"]
    wait_until(lambda: (mirror.cache_dir / "kept").exists())
    time.sleep(0.5)  # the other worker hears of it

    def evictions() -> dict[int, float]:
        return counted_by_worker(mirror, "dockmirror_cache_evictions_total", "")

    # New blobs until each worker had to evict some: the kept ones are the oldest.
    for i in range(40):
        other = seeded(registry, f"{unique_repo}-{i}", "v1", layers=[300_000])
        layer = other.platforms[0].layers[0]
        status, _, body = curl(f"{mirror.url}/v2/{unique_repo}-{i}/blobs/{layer.digest}")
        assert status == 200 and sha256(body) == layer.digest
        if all(evictions().values()):
            break
    else:
        raise AssertionError(f"not every worker evicted: {evictions()}")
    cached = cached_blobs(mirror)
    assert all(blob.digest in cached for blob in kept.blobs)
    assert sum(cached.values()) <= 1 << 20
    assert_cache_sound(mirror)


def _unavailable(request: BaseHTTPRequestHandler) -> bool:
    request.send_response(503)
    request.send_header("Content-Length", "0")
    request.end_headers()
    return True


def test_an_endpoint_down_in_one_worker_is_skipped_by_every_worker(
    registry_factory, dockmirror, seeded, unique_repo
):
    backup = registry_factory()
    seeded(backup, unique_repo, "v1")
    primary = Relay(backup.url, {unique_repo: _unavailable})
    primary.start()
    try:
        hub = {"plugin": "dockerhub", "url": primary.url, "default": True}
        hub["mirrors"] = [{"url": backup.url, "trust_tags": True}]
        mirror = dockmirror({"hub": hub}, extra={"server": {"workers": WORKERS}})
        wait_until(lambda: len(serving_workers(mirror)) == WORKERS, timeout=30, interval=0.1)
        url = f"{mirror.url}/v2/{unique_repo}/manifests/v1"

        def from_the_backup() -> None:
            assert curl("-I", url)[0] == 200  # a HEAD is not cached: it goes upstream

        until_every_worker_answered(mirror, "manifest", from_the_backup)
        # The first worker found the primary down; the others skipped it at once.
        assert primary.count(f"/v2/{unique_repo}/") == 1
        assert "failed in another worker; skipped for 5s" in mirror.log_text()
    finally:
        primary.stop()


def test_connection_limits_hold_for_the_whole_service(plain_registry, dockmirror):
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}},
        extra={"server": {"workers": WORKERS, "max_connections": 4}},
    )
    wait_until(lambda: len(serving_workers(mirror)) == WORKERS, timeout=30, interval=0.1)
    with contextlib.ExitStack() as stack:
        connections = []
        for _ in range(16):
            connection = socket.create_connection((LOOPBACK, mirror.port))
            stack.callback(connection.close)
            connections.append(connection)
            time.sleep(0.05)  # accepted, and refused or held, in turn
        refusals = []
        for connection in connections:
            connection.settimeout(0.5)
            try:
                refusals.append(connection.recv(4096))
            except TimeoutError:  # held: the mirror waits for a request
                continue
        held = len(connections) - len(refusals)
        print(f"held {held} of 16 connections with max_connections = 4 over {WORKERS} workers")
        assert 1 <= held <= 4
        assert all(r.startswith(b"HTTP/1.1 503 ") for r in refusals)
        assert b"this worker's share (1/2) of server.max_connections" in b"".join(refusals)


def test_a_key_revoked_with_dockmirror_admin_is_refused_by_every_worker(plain_registry, dockmirror):
    mirror = start_workers(dockmirror, plain_registry, auth_required=True)
    app_id, api_key = create_key(mirror)
    credentials = [
        basic(app_id, api_key),
        f"Authorization: Bearer {token_for(mirror, app_id, api_key)}",
    ]

    def get(expected: int) -> Callable[[], None]:
        def request() -> None:
            for header in credentials:
                status, _, body = curl("-H", header, f"{mirror.url}/v2/")
                assert status == expected, body

        return request

    until_every_worker_answered(mirror, "base", get(200))
    admin(mirror, "keys", "revoke", app_id)
    time.sleep(5.5)  # workers reload the revoked keys every 5 s
    until_every_worker_answered(mirror, "base", get(401))


def test_the_login_throttle_counts_failures_in_every_worker(plain_registry, dockmirror):
    mirror = start_workers(dockmirror, plain_registry, auth_required=True)
    for _ in range(5):
        app_id, api_key = create_key(mirror)
        before = counted_by_worker(mirror, "dockmirror_auth_attempts_total", '"failure"')
        for _ in range(10):  # the limit for one appId from one address
            assert curl("-H", basic(app_id, "sk_guess"), f"{mirror.url}/v2/")[0] == 401
        after = counted_by_worker(mirror, "dockmirror_auth_attempts_total", '"failure"')
        if all(after[pid] > before[pid] for pid in after):
            break  # failures seen by both workers: neither saw 10 alone
    else:
        raise AssertionError("the failures never went to both workers")

    def refused() -> None:
        status, _, body = curl("-H", basic(app_id, api_key), f"{mirror.url}/v2/")
        assert status == 429, body

    until_every_worker_answered(mirror, "base", refused)


def test_metrics_add_up_across_workers(plain_registry, dockmirror):
    mirror = start_workers(dockmirror, plain_registry)
    # A route only this test asks for (start-up probes ask for /v2/, and may be late).
    url = f"{mirror.url}/v2/library/nothing-here/tags/list"
    count = until_every_worker_answered(mirror, "tags", lambda: curl(url))
    by_worker = requests_by_worker(mirror, "tags")
    assert sum(by_worker.values()) == count and all(by_worker.values())
    # Whichever worker answers /metrics reports the whole service.
    for _ in range(6):
        _, _, body = curl(f"{mirror.url}/metrics")
        lines = [
            line
            for line in body.decode().splitlines()
            if line.startswith("dockmirror_http_requests_total{") and 'route="tags"' in line
        ]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in lines) == count
        # A gauge without a multiprocess mode gets a series per worker pid,
        # and each restarted worker would add more.
        assert 'pid="' not in body.decode()


def test_sighup_reloads_the_certificate_in_every_worker(plain_registry, dockmirror, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_server_tls(tmp_path / "a", "localhost")
    renewed = make_server_tls(tmp_path / "b", "localhost")
    live = ServerTLS(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    for source, target in ((first.certificate, live.certificate), (first.key, live.key)):
        shutil.copy(source, target)
    tls_port = free_port()
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}},
        extra={"server": {"workers": WORKERS}},
        start=False,
    )
    mirror.config["server"]["listen"].append(tls_endpoint(tls_port, LOOPBACK, live))
    mirror.config_path.write_text(toml_document(mirror.config))
    mirror.start()
    wait_until(lambda: len(worker_pids(mirror)) == WORKERS, timeout=30)
    wait_until(lambda: mirror.log_text().count(f"starting on {tls_port}") > WORKERS, timeout=30)
    for source, target in ((renewed.certificate, live.certificate), (renewed.key, live.key)):
        shutil.copy(source, target)
    os.kill(mirror.pid, signal.SIGHUP)
    wait_until(lambda: mirror.log_text().count("SIGHUP: reloading TLS certificates") == WORKERS)
    wait_until(lambda: mirror.log_text().count("loaded TLS certificate") >= WORKERS)
    https = f"https://localhost:{tls_port}/v2/"

    def renewed_certificate() -> None:
        assert curl("--cacert", str(renewed.ca), https)[0] == 200

    until_every_worker_answered(mirror, "base", renewed_certificate)
    assert mirror.running  # SIGHUP did not stop the supervisor


def test_sigterm_to_the_supervisor_leaves_no_process(plain_registry, dockmirror):
    mirror = start_workers(dockmirror, plain_registry)
    processes = [mirror.pid, *worker_pids(mirror)]
    directory = metrics_directory(processes[1])
    os.kill(mirror.pid, signal.SIGTERM)  # the supervisor alone, as systemd's KillMode=mixed
    wait_until(lambda: not mirror.running, timeout=30)
    for pid in processes:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
    assert not directory.exists()


def test_workers_stop_when_the_supervisor_is_killed(plain_registry, dockmirror):
    mirror = start_workers(dockmirror, plain_registry)
    workers = worker_pids(mirror)
    os.kill(mirror.pid, signal.SIGKILL)
    wait_until(lambda: all(not _alive(pid) for pid in workers), timeout=30)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    try:
        return _state(pid) != "Z"
    except FileNotFoundError:
        return False
