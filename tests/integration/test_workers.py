"""``[server] workers = N``: the supervisor and its workers, end to end.

Which worker answered a request is read from the workers' own metric files
(``prometheus_client``'s multiprocess directory, one file per process), so a
test can make requests until every worker has served some.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict

from dockmirror.cache.parts import plan

from .clients import ServerTLS, make_server_tls, tls_endpoint
from .conftest import Dockmirror, DockmirrorFactory, toml_document
from .keys import admin, create_key
from .registries import LOOPBACK, Registry, free_port, wait_until
from .test_auth import basic, token_for
from .test_cache import assert_cache_sound, cached_blobs, sha256
from .test_pull import curl

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
    layer = image.platforms[0].layers[0]
    manifest_url = f"{mirror.url}/v2/{unique_repo}/manifests/v1"
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    with ThreadPoolExecutor(16) as pool:
        manifests = list(pool.map(lambda _: curl(manifest_url), range(16)))
        results = list(pool.map(lambda _: curl(url), range(16)))
    assert {(status, body) for status, _, body in manifests} == {(200, image.manifest)}
    manifest_gets = registry.count_requests("GET", f"{unique_repo}/manifests/v1")
    print(f"upstream manifest GETs for 16 cold clients over {WORKERS} workers: {manifest_gets}")
    assert manifest_gets <= WORKERS
    for status, _, body in results:
        assert status == 200
        assert sha256(body) == layer.digest
    assert registry.count_requests("GET", f"/blobs/{layer.digest}") == 1
    assert cached_blobs(mirror)[layer.digest] == layer.size
    # Every worker serves it from the cache now, without asking for it again.
    until_every_worker_answered(mirror, "blob", lambda: curl(url))
    assert registry.count_requests("GET", f"/blobs/{layer.digest}") == 1
    assert_cache_sound(mirror)


def test_downloads_at_once_spread_evenly_over_the_workers(
    plain_registry, dockmirror, seeded, unique_repo
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[32 << 20])
    mirror = start_workers(dockmirror, plain_registry)
    layer = image.platforms[0].layers[0]
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
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
    layer = image.platforms[0].layers[0]
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
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
            on_disk = sum(cached_blobs(mirror).values()) + sum(
                p.stat().st_size for p in (mirror.cache_dir / "tmp").iterdir() if p.exists()
            )
            peak = max(peak, on_disk)
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


def test_kill_9_of_a_filling_worker(slow_upstream, dockmirror, seeded, unique_repo):
    registry, relay = slow_upstream
    image = seeded(registry, unique_repo, "v1", layers=[64 << 20])
    mirror = start_workers(dockmirror, relay)
    layer = image.platforms[0].layers[0]
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
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
    assert client.returncode != 0 and len(body) < layer.size  # cut short, never "complete"
    assert layer.digest not in cached_blobs(mirror)
    # The supervisor starts a worker in its place.
    wait_until(
        lambda: filler not in worker_pids(mirror) and len(serving_workers(mirror)) == WORKERS,
        timeout=30,
    )
    assert "worker 0 (pid" in mirror.log_text() and "restarting worker" in mirror.log_text()
    status, _, body = curl(url)
    assert status == 200 and sha256(body) == layer.digest
    assert cached_blobs(mirror)[layer.digest] == layer.size
    assert_cache_sound(mirror)


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
