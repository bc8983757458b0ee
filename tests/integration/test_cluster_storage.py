"""Three dockmirror nodes sharing one PostgreSQL and one S3 bucket (Ceph RGW).

Each node is a real ``twistd`` process with its own cache directory and
cluster listener; the upstream is a real ``docker-registry`` whose access
log counts the blob GETs, behind a relay that caps its speed where a fill
must last.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg

from dockmirror.cluster.database import BACKOFF

from . import test_cluster_cache
from .ceph import S3Bucket
from .conftest import Dockmirror, DockmirrorFactory
from .images import pull
from .registries import Registry, wait_until
from .test_cache import assert_cache_sound, cached_blobs, metric, sha256
from .test_cluster_cache import NODES, kill_the_filler, start_nodes, timed_get
from .test_pull import assert_pulled, curl
from .test_storage import objects, stored, uploads

slow_cluster = test_cluster_cache.slow_cluster  # the fixture, here too


def cluster(
    dockmirror: DockmirrorFactory,
    upstream: Registry,
    postgres: str,
    s3: S3Bucket,
    count: int = NODES,
    **storage: object,
) -> list[Dockmirror]:
    """*count* nodes of one cluster over *postgres*, with the bucket *s3* as their shared tier."""
    return start_nodes(
        dockmirror, upstream, postgres, count, every={"storage": s3.storage_table(**storage)}
    )


def blob_gets(registry: Registry, digest: str) -> int:
    return registry.count_requests("GET", f"/blobs/{digest}")


def key(digest: str) -> str:
    return f"blobs/sha256/{digest.partition(':')[2]}"


def recorded(postgres: str) -> dict[str, int]:
    """The bucket's objects as the cluster's records hold them."""
    with psycopg.connect(postgres, autocommit=True) as conn:
        return dict(conn.execute("SELECT digest, size FROM storage_objects").fetchall())


def uploads_stored(nodes: list[Dockmirror]) -> float:
    return sum(metric(node, 'dockmirror_storage_uploads_total{result="stored"}') for node in nodes)


def test_24_cold_clients_make_one_fetch_and_one_upload_and_a_wiped_node_reads_the_bucket(
    slow_cluster, unique_repo, postgres, s3
):
    registry, nodes, layer = slow_cluster(16 << 20, 24 << 20, {"storage": s3.storage_table()})
    urls = [f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}" for node in nodes]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(timed_get, [urls[i % NODES] for i in range(24)]))
    for status, body, _, _ in results:
        assert status == 200 and sha256(body) == layer.digest
    assert blob_gets(registry, layer.digest) == 1
    firsts = sorted(r[2] for r in results)
    print(f"\nfirst byte of 24 cold clients: median {firsts[12]:.3f} s, max {firsts[-1]:.3f} s")
    wait_until(lambda: stored(s3, layer.digest) is not None, timeout=30)
    assert sha256(stored(s3, layer.digest) or b"") == layer.digest
    assert objects(s3) == {key(layer.digest): layer.size}
    wait_until(lambda: recorded(postgres) == {layer.digest: layer.size})
    assert uploads(s3) == []
    assert uploads_stored(nodes) == 1  # one upload for the cluster
    for node in nodes:
        wait_until(lambda node=node: layer.digest in cached_blobs(node), timeout=20)

    # A node whose local disk was wiped reads the bucket, not its peers or the upstream.
    wiped = nodes[1]
    wiped.stop()
    shutil.rmtree(wiped.cache_dir)
    wiped.start()
    status, headers, body = curl(urls[1])
    assert (status, sha256(body)) == (200, layer.digest)
    assert (headers["x-cache"], headers["x-cache-tier"]) == ("HIT", "shared")
    wait_until(lambda: layer.digest in cached_blobs(wiped), timeout=20)
    assert_cache_sound(wiped)
    assert metric(wiped, "dockmirror_cluster_received_bytes_total") == 0
    assert blob_gets(registry, layer.digest) == 1
    assert uploads_stored([wiped]) == 0  # it stored nothing again


def test_the_bucket_quota_is_one_for_the_cluster_with_lru_by_reads_on_every_node(
    registry_factory, dockmirror, seeded, unique_repo, postgres, s3
):
    registry = registry_factory()
    quota = 1 << 20
    a, b, c = cluster(dockmirror, registry, postgres, s3, max_size="1MiB")
    layers = [
        seeded(registry, f"{unique_repo}-{i}", "v1", layers=[400_000]).platforms[0].layers[0]
        for i in range(3)
    ]

    def get(node: Dockmirror, i: int) -> dict[str, str]:
        status, headers, body = curl(f"{node.url}/v2/{unique_repo}-{i}/blobs/{layers[i].digest}")
        assert (status, sha256(body)) == (200, layers[i].digest)
        return headers

    get(a, 0)
    wait_until(lambda: layers[0].digest in recorded(postgres), timeout=30)
    get(b, 1)
    wait_until(lambda: layers[1].digest in recorded(postgres), timeout=30)
    # Layer 0 is read on a third node, from the bucket: the most recently used now.
    assert get(c, 0)["x-cache-tier"] == "shared"
    get(c, 2)  # over the quota: the least recently used of the cluster goes
    wait_until(lambda: layers[2].digest in recorded(postgres), timeout=30)
    wait_until(lambda: key(layers[1].digest) not in objects(s3), timeout=10)
    assert set(objects(s3)) == {key(layers[0].digest), key(layers[2].digest)}
    assert set(recorded(postgres)) == {layers[0].digest, layers[2].digest}
    assert sum(objects(s3).values()) <= quota
    assert "removing " + layers[1].digest in c.log_text()  # evicted by another node than b
    for i, layer in enumerate(layers):
        assert blob_gets(registry, layer.digest) == 1, i


def test_kill_9_of_the_filling_node_mid_fill_with_the_bucket(
    slow_cluster, unique_repo, postgres, s3
):
    registry, nodes, layer = slow_cluster(4 << 20, 28 << 20, {"storage": s3.storage_table()})
    leader, *others = nodes
    path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    # Killed once its first part is in the bucket: the leader's upload exists.
    kill_the_filler(nodes, path, layer, lambda: wait_until(lambda: uploads(s3) != [], timeout=20))
    assert blob_gets(registry, layer.digest) <= 2
    # The node that took the claim over stored the blob, and aborted the dead one's upload.
    wait_until(lambda: stored(s3, layer.digest) is not None, timeout=30)
    assert sha256(stored(s3, layer.digest) or b"") == layer.digest
    assert objects(s3) == {key(layer.digest): layer.size}
    wait_until(lambda: uploads(s3) == [], timeout=20)
    assert uploads_stored(others) == 1
    assert any("aborted 1 incomplete uploads" in n.log_text() for n in others)
    wait_until(lambda: recorded(postgres) == {layer.digest: layer.size})
    # The dead node kept nothing partial, and reads the bucket when it is back.
    leader.start()
    assert layer.digest not in cached_blobs(leader)
    status, headers, got = curl(leader.url + path)
    assert (status, sha256(got), headers.get("x-cache-tier")) == (200, layer.digest, "shared")
    assert blob_gets(registry, layer.digest) <= 2


def test_redirect_in_a_cluster_sends_skopeo_to_the_bucket_from_any_node(
    registry_factory, dockmirror, seeded, unique_repo, postgres, s3, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[12 << 20])
    layer = image.platforms[0].layers[0]
    nodes = cluster(dockmirror, registry, postgres, s3, redirect=True)
    pull(f"{nodes[0].host}/{unique_repo}:v1", tmp_path / "first")  # cold: filled, then stored
    assert_pulled(tmp_path / "first", image)
    wait_until(lambda: layer.digest in recorded(postgres), timeout=30)
    for i, node in enumerate(nodes[1:], 1):
        status, headers, _ = curl(f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}")
        assert status == 307 and "X-Amz-Signature=" in headers["location"]
        pull(f"{node.host}/{unique_repo}:v1", tmp_path / f"node{i}")
        assert_pulled(tmp_path / f"node{i}", image)
        assert layer.digest not in cached_blobs(node)  # the bytes never went through it
    assert blob_gets(registry, layer.digest) == 1
    # Every node that handed out a URL holds a lease on the object until it expires.
    with psycopg.connect(postgres, autocommit=True) as conn:
        readers = conn.execute(
            "SELECT node_url FROM storage_readers WHERE digest = %s AND expires > now()",
            (layer.digest,),
        ).fetchall()
    holders = {row[0].partition("#")[0] for row in readers}
    assert holders >= {str(n.config["cluster"]["node_url"]) for n in nodes[1:]}


def test_while_postgresql_is_down_the_bucket_still_serves_and_nothing_is_uploaded(
    registry_factory, dockmirror, seeded, unique_repo, postgres, postgres_server, s3
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 20, 2 << 20, 3 << 20])
    kept, missed, later = image.platforms[0].layers
    first, second = cluster(dockmirror, registry, postgres, s3, count=2)
    url = f"/v2/{unique_repo}/blobs/"
    assert curl(first.url + url + kept.digest)[0] == 200
    wait_until(lambda: kept.digest in recorded(postgres), timeout=30)
    postgres_server.stop()
    try:
        # A node that never had it reads it from the bucket, without a lease.
        status, headers, body = curl(second.url + url + kept.digest)
        assert (status, sha256(body), headers["x-cache-tier"]) == (200, kept.digest, "shared")
        # A miss is fetched alone, and not stored: no upload goes unrecorded.
        status, _, body = curl(second.url + url + missed.digest)
        assert (status, sha256(body)) == (200, missed.digest)
        wait_until(lambda: "not stored: the cluster database is unavailable" in second.log_text())
    finally:
        postgres_server.start()
    assert key(missed.digest) not in objects(s3)
    time.sleep(BACKOFF)  # the nodes try PostgreSQL again after this
    assert curl(second.url + url + later.digest)[0] == 200
    wait_until(lambda: later.digest in recorded(postgres), timeout=30)
    assert set(objects(s3)) == {key(kept.digest), key(later.digest)}
    assert blob_gets(registry, kept.digest) == 1
