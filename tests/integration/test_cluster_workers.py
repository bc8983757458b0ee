"""Cluster nodes of several workers: one upstream fetch per digest and per tag for all.

Two real ``twistd`` nodes, each a supervisor with two workers, share one
PostgreSQL database (``postgres``).  The cluster listener's socket is bound
by the supervisor and served by both workers, like the public one, so a
request of another node may land on the worker that does not fill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import Dockmirror, DockmirrorFactory
from .images import Layer
from .registries import Registry, wait_until
from .test_cache import assert_cache_sound, cached_blobs, sha256
from .test_cluster_cache import _secret, blob_gets, listener, start_nodes, timed_get
from .test_pull import curl
from .test_workers import (
    SlowUpstream,
    requests_by_worker,
    serving_workers,
    until_every_worker_answered,
    worker_pids,
)

WORKERS = 2
#: Seconds a tag stays fresh in these tests, so that a test sees it revalidated.
TTL = 3


def start_cluster(
    dockmirror: DockmirrorFactory, upstream: Registry | SlowUpstream, database: str, **cache: object
) -> list[Dockmirror]:
    """Two nodes of two workers each, every worker serving."""
    every = {"server": {"workers": WORKERS}, "cache": cache}
    nodes = start_nodes(dockmirror, upstream, database, count=2, every=every)
    for node in nodes:
        wait_until(lambda node=node: len(serving_workers(node)) == WORKERS, timeout=30)
    return nodes


def writer_of(node: Dockmirror, directory: Path) -> int | None:
    """The worker with a file of *directory* open for writing (the others may read it)."""
    for pid in worker_pids(node):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
                flags = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text().split()
            except FileNotFoundError:
                continue
            access = int(flags[flags.index("flags:") + 1], 8) & os.O_ACCMODE
            if target.startswith(f"{directory}/") and access != os.O_RDONLY:
                return pid
    return None


def pull(url: str) -> tuple[int, bytes]:
    """curl's exit status and the body it got (cut short if the server cut it)."""
    done = subprocess.run(
        ["curl", "-s", "--noproxy", "*", "--max-time", "60", "-o", "-", url],
        capture_output=True,
        check=False,
    )
    return done.returncode, done.stdout


@pytest.fixture
def slow_registry(registry_factory):
    relays: list[SlowUpstream] = []

    def make(rate: int) -> tuple[Registry, SlowUpstream]:
        registry = registry_factory()
        relays.append(SlowUpstream(registry, rate))
        return registry, relays[-1]

    yield make
    for relay in relays:
        relay.close()


def test_16_cold_clients_over_2_nodes_of_2_workers_make_one_upstream_request(
    slow_registry, dockmirror, seeded, unique_repo, postgres
):
    registry, relay = slow_registry(16 << 20)
    image = seeded(registry, unique_repo, "v1", layers=[24 << 20])
    layer = image.platforms[0].layers[0]
    nodes = start_cluster(dockmirror, relay, postgres, manifest_ttl=TTL)
    tag = f"/v2/{unique_repo}/manifests/v1"
    blob = f"/v2/{unique_repo}/blobs/{layer.digest}"

    def manifest_requests() -> tuple[int, int]:
        return registry.count_requests("GET", tag), registry.count_requests("HEAD", tag)

    before = {node.pid: requests_by_worker(node, "blob") for node in nodes}
    seeding = registry.count_requests("HEAD", f"/blobs/{layer.digest}")
    with ThreadPoolExecutor(16) as pool:
        manifests = list(pool.map(lambda i: curl(nodes[i % 2].url + tag), range(16)))
        assert {(status, body) for status, _, body in manifests} == {(200, image.manifest)}
        assert manifest_requests() == (1, 0)
        results = list(pool.map(lambda i: timed_get(nodes[i % 2].url + blob), range(16)))
    for status, body, _, _ in results:
        assert status == 200 and sha256(body) == layer.digest
    assert blob_gets(registry, layer.digest) == 1
    heads = registry.count_requests("HEAD", f"/blobs/{layer.digest}") - seeding
    print(f"\nupstream HEADs of the layer for 16 cold clients over 2 nodes x 2 workers: {heads}")
    assert heads == 1
    # The clients were spread over all four workers.
    for node in nodes:
        served = requests_by_worker(node, "blob")
        assert all(served[pid] > before[node.pid].get(pid, 0) for pid in served), served
    # Past its TTL, the tag is revalidated with one HEAD for the whole cluster.
    time.sleep(TTL + 0.5)
    with ThreadPoolExecutor(16) as pool:
        manifests = list(pool.map(lambda i: curl(nodes[i % 2].url + tag), range(16)))
    assert {(status, body) for status, _, body in manifests} == {(200, image.manifest)}
    caches = sorted(headers["x-cache"] for _, headers, _ in manifests)
    print(f"16 clients of a tag past its TTL: {caches}")
    assert manifest_requests() == (1, 1)
    for node in nodes:
        wait_until(lambda node=node: layer.digest in cached_blobs(node), timeout=20)
        assert_cache_sound(node)


def test_clients_following_a_fill_on_other_workers_and_nodes_ask_the_upstream_nothing(
    slow_registry, dockmirror, seeded, unique_repo, postgres
):
    registry, relay = slow_registry(4 << 20)
    image = seeded(registry, unique_repo, "v1", layers=[16 << 20])
    layer = image.platforms[0].layers[0]
    first, second = start_cluster(dockmirror, relay, postgres)
    blob = f"/v2/{unique_repo}/blobs/{layer.digest}"
    heads = registry.count_requests("HEAD", f"/blobs/{layer.digest}")  # the seeding's
    with ThreadPoolExecutor(9) as pool:
        leader = pool.submit(pull, first.url + blob)
        temp = first.cache_dir / "tmp"
        # Past the second in which processes take a result they just heard as it is.
        wait_until(lambda: any(p.stat().st_size > 6 << 20 for p in temp.iterdir()))
        followers = [pool.submit(pull, node.url + blob) for node in (first, second) * 4]
        results = [leader.result(), *(f.result() for f in followers)]
    for code, body in results:
        assert code == 0 and sha256(body) == layer.digest
    assert blob_gets(registry, layer.digest) == 1
    # The leader's HEAD proved the layer for every worker of every node.
    assert registry.count_requests("HEAD", f"/blobs/{layer.digest}") == heads + 1


def test_the_cluster_listener_serves_a_fill_of_either_worker(
    slow_registry, dockmirror, seeded, unique_repo, postgres
):
    registry, relay = slow_registry(4 << 20)
    image = seeded(registry, unique_repo, "v1", layers=[12 << 20])
    layer = image.platforms[0].layers[0]
    [node] = start_nodes(
        dockmirror, relay, postgres, count=1, every={"server": {"workers": WORKERS}}, pool_size=2
    )
    wait_until(lambda: len(serving_workers(node)) == WORKERS, timeout=30)
    # Each worker: a pool of 2, the listening connection and the fill claims'; the
    # test's server allows 300, 3 of them for superusers.
    wait_until(lambda: "may open 8 connections to PostgreSQL, which allows 297" in node.log_text())
    url = f"{listener(node)}/_cluster/blobs/{layer.digest}"
    secret = _secret(postgres)

    def from_the_listener(_: int) -> tuple[int, bytes]:
        done = subprocess.run(
            ["curl", "-s", "--noproxy", "*", "-H", f"Authorization: Bearer {secret}", url],
            capture_output=True,
            check=False,
        )
        return done.returncode, done.stdout

    with ThreadPoolExecutor(7) as pool:
        client = pool.submit(pull, f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}")
        temp = node.cache_dir / "tmp"
        wait_until(lambda: any(p.stat().st_size for p in temp.iterdir()), interval=0.01)
        filler = writer_of(node, temp)
        # Six other nodes, as the listener sees them: spread over both workers.
        results = list(pool.map(from_the_listener, range(6)))
        assert client.result()[0] == 0
    assert filler is not None
    for code, body in results:
        assert code == 0 and sha256(body) == layer.digest
    assert blob_gets(registry, layer.digest) == 1
    followed = node.log_text().count(f"streaming {layer.digest} to a node from another worker")
    print(f"\nlistener requests answered by the worker that did not fill: {followed} of 6")
    assert followed >= 1


def test_kill_9_of_the_filling_worker_of_a_node(
    slow_registry, dockmirror, seeded, unique_repo, postgres
):
    registry, relay = slow_registry(4 << 20)
    image = seeded(registry, unique_repo, "v1", layers=[24 << 20])
    layer: Layer = image.platforms[0].layers[0]
    first, second = start_cluster(dockmirror, relay, postgres)
    blob = f"/v2/{unique_repo}/blobs/{layer.digest}"
    temp = first.cache_dir / "tmp"
    with ThreadPoolExecutor(9) as pool:
        lead = pool.submit(pull, first.url + blob)
        wait_until(lambda: any(p.stat().st_size for p in temp.iterdir()), interval=0.01)
        on_first = [pool.submit(pull, first.url + blob) for _ in range(4)]
        on_second = [pool.submit(pull, second.url + blob) for _ in range(4)]
        wait_until(lambda: f"filling {layer.digest} from" in second.log_text(), interval=0.05)
        filler = writer_of(first, temp)
        assert filler is not None
        os.kill(filler, signal.SIGKILL)
        cut = [lead.result(), *(f.result() for f in on_first)]
        followed = [f.result() for f in on_second]
    # Clients of the first node got the whole layer or were cut short: never a wrong one.
    for code, body in cut:
        assert (code == 0 and sha256(body) == layer.digest) or len(body) < layer.size
    assert lead.result()[0] != 0  # the killed worker's own client
    # The second node's clients never noticed: one of its workers took the fill over.
    for code, body in followed:
        assert code == 0 and sha256(body) == layer.digest
    assert "resuming" in second.log_text()
    # The supervisor restarted the killed worker; every worker of both nodes serves the layer.
    wait_until(
        lambda: filler not in worker_pids(first) and len(serving_workers(first)) == WORKERS,
        timeout=30,
    )
    assert "restarting worker" in first.log_text()
    for node in (first, second):
        until_every_worker_answered(node, "blob", lambda node=node: _whole(node.url + blob, layer))
        assert cached_blobs(node)[layer.digest] == layer.size
        assert_cache_sound(node)
    # The upstream was asked again for the rest only.
    assert blob_gets(registry, layer.digest) <= 2
    assert not list(Path(temp).iterdir())


def _whole(url: str, layer: Layer) -> None:
    code, body = pull(url)
    assert code == 0 and sha256(body) == layer.digest
