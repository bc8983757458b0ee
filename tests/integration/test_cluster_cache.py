"""Three dockmirror nodes sharing one PostgreSQL: one upstream fetch per digest for all.

Each node is a real ``twistd`` process with its own port, cache directory and
cluster listener; they share a database of the test's own (``postgres``) and
one ``docker-registry`` upstream, whose access log counts the GETs.
"""

from __future__ import annotations

import http.server
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from dockmirror.cluster.coordinator import lock_key
from dockmirror.cluster.index import PURGE_POLL, PURGE_SETTLED

from . import test_manhole
from .conftest import Dockmirror, DockmirrorFactory
from .images import Layer
from .registries import LOOPBACK, Registry, free_port, wait_until
from .test_cache import assert_cache_sound, cached_blobs, metric, sha256
from .test_pull import curl
from .test_workers import SlowUpstream

NODES = 3
#: Seconds the nodes go without asking PostgreSQL after it failed (``[cluster] backoff``).
BACKOFF = 0.5


def start_nodes(
    dockmirror: DockmirrorFactory,
    upstream: Registry | SlowUpstream | dict[str, dict[str, object]],
    database: str,
    count: int = NODES,
    first: dict[str, dict[str, object]] | None = None,
    every: dict[str, dict[str, object]] | None = None,
    **cluster: object,
) -> list[Dockmirror]:
    """*count* nodes of one cluster, mirroring *upstream* (or these ``[upstreams]`` tables).

    *every* adds tables to every node's configuration, *first* to the first node's.
    """
    if not isinstance(upstream, dict):
        upstream = {"hub": {"plugin": "dockerhub", "url": upstream.url, "default": True}}
    nodes = []
    for _ in range(count):
        port = free_port()
        table = {
            "database": database,
            "listen": f"tcp:{port}:interface={LOOPBACK}",
            "node_url": f"http://{LOOPBACK}:{port}",
            **cluster,
        }
        extra = {"cluster": table, **(every or {}), **((first or {}) if not nodes else {})}
        nodes.append(dockmirror(upstream, extra=extra))
    return nodes


def listener(node: Dockmirror) -> str:
    return str(node.config["cluster"]["node_url"])


def blob_gets(registry: Registry, digest: str) -> int:
    return registry.count_requests("GET", f"/blobs/{digest}")


def timed_get(url: str) -> tuple[int, bytes, float, float]:
    """Status, body, seconds to the first byte and in all, as curl measured them."""
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-S",
            "--noproxy",
            "*",
            "--max-time",
            "60",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{time_starttransfer} %{time_total}",
            url,
        ],
        capture_output=True,
        check=False,
    ).stdout
    body, _, trailer = out.rpartition(b"\n")
    status, first, total = trailer.decode().split()
    return int(status), body, float(first), float(total)


SlowCluster = Callable[..., tuple[Registry, list[Dockmirror], Layer]]


@pytest.fixture
def slow_cluster(
    registry_factory, dockmirror, seeded, unique_repo, postgres
) -> Iterator[SlowCluster]:
    """``make(rate, size, every=None)``: 3 nodes over an upstream sending *rate* bytes/s,
    and a layer; *every* adds tables to every node's configuration."""
    relays: list[SlowUpstream] = []

    def make(
        rate: int, size: int, every: dict[str, dict[str, object]] | None = None
    ) -> tuple[Registry, list[Dockmirror], Layer]:
        registry = registry_factory()
        relays.append(SlowUpstream(registry, rate))
        image = seeded(registry, unique_repo, "v1", layers=[size])
        nodes = start_nodes(dockmirror, relays[-1], postgres, every=every)
        return registry, nodes, image.platforms[0].layers[0]

    yield make
    for relay in relays:
        relay.close()


def test_24_cold_clients_over_3_nodes_make_one_upstream_fetch(slow_cluster, unique_repo):
    registry, nodes, layer = slow_cluster(16 << 20, 32 << 20)
    urls = [f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}" for node in nodes]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(timed_get, [urls[i % NODES] for i in range(24)]))
    for status, body, _, _ in results:
        assert status == 200
        assert sha256(body) == layer.digest
    assert blob_gets(registry, layer.digest) == 1
    [leader] = [i for i, n in enumerate(nodes) if f"filling {layer.digest} (" in n.log_text()]
    # The followers' bytes came from the leader's node, none from the upstream.
    for i, node in enumerate(nodes):
        from_nodes = metric(node, "dockmirror_cluster_received_bytes_total")
        from_upstream = metric(node, "dockmirror_upstream_received_bytes_total")
        assert (from_upstream, from_nodes) == ((layer.size, 0) if i == leader else (0, layer.size))
    print(f"\ntime to first byte (s) of 24 cold clients, node {leader} leading:")
    for i in range(NODES):
        firsts = sorted(r[2] for j, r in enumerate(results) if j % NODES == i)
        totals = sorted(r[3] for j, r in enumerate(results) if j % NODES == i)
        print(
            f"  node {i}: first byte median {firsts[len(firsts) // 2]:.3f} max {firsts[-1]:.3f};"
            f" whole blob median {totals[len(totals) // 2]:.3f}"
        )
    for node in nodes:
        wait_until(lambda node=node: layer.digest in cached_blobs(node), timeout=20)
        assert cached_blobs(node)[layer.digest] == layer.size
        assert_cache_sound(node)
    # Warm now on every node: no more upstream GETs.
    for url in urls:
        status, _, body = curl(url)
        assert status == 200 and sha256(body) == layer.digest
    assert blob_gets(registry, layer.digest) == 1


def test_a_blob_cached_on_one_node_is_copied_from_it_by_another(
    registry_factory, dockmirror, seeded, unique_repo, postgres
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[4 << 20])
    first, second = start_nodes(dockmirror, registry, postgres, count=2)
    layer = image.platforms[0].layers[0]
    heads = registry.count_requests("HEAD", f"/blobs/{layer.digest}")  # the seeding's
    for node in (first, second):
        status, _, body = curl(f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}")
        assert status == 200 and sha256(body) == layer.digest
        # Recorded once committed, a moment after the client has every byte.
        wait_until(lambda: _rows(postgres, "cache_access") == 1)
    assert blob_gets(registry, layer.digest) == 1
    assert f"filling {layer.digest} from {listener(first)}" in second.log_text()
    # The upstream's proof that it has the blob, given to the first node, holds for the second.
    assert registry.count_requests("HEAD", f"/blobs/{layer.digest}") == heads + 1


def test_a_blob_is_served_only_through_upstreams_that_proved_they_have_it(
    registry_factory, dockmirror, seeded, unique_repo, postgres
):
    public, private = registry_factory(), registry_factory()
    secret = seeded(private, unique_repo, "v1").platforms[0].layers[0]
    upstreams: dict[str, dict[str, object]] = {
        "public": {"plugin": "registry", "url": public.url, "default": True},
        "private": {"plugin": "registry", "url": private.url, "aliases": ["private.test"]},
    }
    first, second = start_nodes(dockmirror, upstreams, postgres, count=2)
    status, _, body = curl(f"{first.url}/v2/private.test/{unique_repo}/blobs/{secret.digest}")
    assert status == 200 and sha256(body) == secret.digest
    wait_until(lambda: secret.digest in cached_blobs(first))
    # The other node holds no proof from the public upstream, which does not have it.
    for method in ("GET", "HEAD"):
        status, _, _ = curl(f"{second.url}/v2/{unique_repo}/blobs/{secret.digest}", method=method)
        assert status == 404, method
    assert public.count_requests("HEAD", f"/blobs/{secret.digest}") >= 1
    # Through the private upstream it is served, copied from the first node.
    status, _, body = curl(f"{second.url}/v2/private.test/{unique_repo}/blobs/{secret.digest}")
    assert status == 200 and sha256(body) == secret.digest
    assert blob_gets(private, secret.digest) == 1
    assert public.count_requests("GET", f"/blobs/{secret.digest}") == 0


def kill_the_filler(
    nodes: list[Dockmirror], path: str, layer: Layer, before: Callable[[], object] = lambda: None
) -> None:
    """Kill -9 the first of *nodes* while it fills *path*, two clients on each other node
    following it; *before* is called just before the kill.

    The dead node's client must be cut short, and the others must get the whole layer.
    """
    leader, *others = nodes
    lead = subprocess.Popen(
        ["curl", "-s", "--noproxy", "*", "-o", "-", leader.url + path], stdout=subprocess.PIPE
    )
    temp = leader.cache_dir / "tmp"
    wait_until(lambda: any(p.stat().st_size for p in temp.iterdir()), interval=0.01)
    with ThreadPoolExecutor(4) as pool:
        followers = [pool.submit(timed_get, node.url + path) for node in others for _ in "ab"]
        wait_until(
            lambda: all(f"filling {layer.digest} from" in n.log_text() for n in others),
            interval=0.05,
        )
        before()
        leader.kill9()
        body, _ = lead.communicate(timeout=60)
        results = [f.result() for f in followers]
    # The dead node's client was cut short, never given a complete-looking body.
    assert lead.returncode != 0 or len(body) < layer.size
    # Its followers never noticed: another node took the fill over.
    for status, got, _, _ in results:
        assert status == 200 and sha256(got) == layer.digest


def test_kill_9_of_the_filling_node_mid_fill(slow_cluster, unique_repo):
    registry, nodes, layer = slow_cluster(4 << 20, 24 << 20)
    leader, *others = nodes
    path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    kill_the_filler(nodes, path, layer)
    assert any("resuming" in n.log_text() for n in others)
    for node in others:
        wait_until(lambda node=node: layer.digest in cached_blobs(node), timeout=20)
        assert_cache_sound(node)
        status, _, got = curl(node.url + path)
        assert status == 200 and sha256(got) == layer.digest
    # The upstream was asked again for the rest only, not once per node.
    assert blob_gets(registry, layer.digest) <= 2
    # Nothing partial was kept by the dead node either.
    leader.start()
    assert layer.digest not in cached_blobs(leader)
    status, _, got = curl(leader.url + path)
    assert status == 200 and sha256(got) == layer.digest
    assert blob_gets(registry, layer.digest) <= 2


def test_a_tag_resolved_on_one_node_is_fresh_on_the_others(
    registry_factory, dockmirror, seeded, unique_repo, postgres
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 10])
    nodes = start_nodes(dockmirror, registry, postgres)
    url = f"/v2/{unique_repo}/manifests/v1"
    status, headers, body = curl(nodes[0].url + url)
    assert status == 200 and body == image.manifest
    for node in nodes[1:]:
        status, headers, body = curl(node.url + url)
        assert status == 200 and body == image.manifest
        assert headers["x-cache"] == "HIT"
    assert registry.count_requests("GET", f"{unique_repo}/manifests/v1") == 1
    assert registry.count_requests("HEAD", f"{unique_repo}/manifests/v1") == 0


def test_a_tag_past_its_ttl_is_asked_for_again(
    registry_factory, dockmirror, seeded, unique_repo, postgres
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 10])
    ttl = {"cache": {"manifest_ttl": 2}}
    first, second = start_nodes(dockmirror, registry, postgres, count=2, every=ttl)
    url = f"/v2/{unique_repo}/manifests/v1"
    status, _, _ = curl(first.url + url)
    assert status == 200
    time.sleep(2.5)
    status, headers, body = curl(second.url + url)
    assert status == 200 and body == image.manifest and headers["x-cache"] == "MISS"
    assert registry.count_requests("GET", f"{unique_repo}/manifests/v1") == 2


def test_the_cluster_listener_refuses_strangers(
    registry_factory, dockmirror, seeded, unique_repo, postgres
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 10])
    [node] = start_nodes(dockmirror, registry, postgres, count=1)
    layer = image.platforms[0].layers[0]
    status, _, _ = curl(f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}")
    assert status == 200
    blob = f"{listener(node)}/_cluster/blobs/{layer.digest}"
    secret = _secret(postgres)
    refused: list[tuple[str, ...]] = [
        (blob,),
        ("-H", "Authorization: Bearer wrong", blob),
        ("-H", f"Authorization: Bearer {secret}x", blob),
        ("-H", f"Authorization: Basic {secret}", blob),
        ("-H", f"Authorization: Bearer {secret}", f"{listener(node)}/v2/"),
        ("-H", f"Authorization: Bearer {secret}", f"{blob}/../../etc/passwd"),
        ("-H", f"Authorization: Bearer {secret}", f"{listener(node)}/_cluster/blobs/sha256:00"),
    ]
    for args in refused:
        status, headers, body = curl(*args)
        assert status in (401, 404), args
        assert headers["content-type"] == "application/json"
        assert b'"errors"' in body and b"Traceback" not in body
    status, _, body = curl("-H", f"Authorization: Bearer {secret}", blob)
    assert status == 200 and sha256(body) == layer.digest
    status, headers, body = curl(
        "-H", f"Authorization: Bearer {secret}", "-H", "Range: bytes=100-", blob
    )
    assert status == 206 and headers["content-range"] == f"bytes 100-{layer.size - 1}/{layer.size}"


def _secret_or_none(database: str) -> str | None:
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT secret FROM cluster_secret").fetchone()
    return None if row is None else str(row[0])


def _secret(database: str) -> str:
    secret = _secret_or_none(database)
    assert secret is not None
    return secret


def test_a_secret_file_is_used_instead(
    registry_factory, dockmirror, seeded, unique_repo, postgres, tmp_path: Path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 10])
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text("s3cr3t-of-the-cluster-nodes\n")
    [node] = start_nodes(dockmirror, registry, postgres, count=1, secret_file=str(secret_file))
    layer = image.platforms[0].layers[0]
    curl(f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}")
    blob = f"{listener(node)}/_cluster/blobs/{layer.digest}"
    status, _, body = curl("-H", "Authorization: Bearer s3cr3t-of-the-cluster-nodes", blob)
    assert status == 200 and sha256(body) == layer.digest
    status, _, _ = curl("-H", "Authorization: Bearer s3cr3t-of-the-cluster-node", blob)
    assert status == 401
    assert _secret_or_none(postgres) is None  # none was made


def test_nodes_fetch_alone_while_postgresql_is_down_and_share_again_after(
    registry_factory, dockmirror, seeded, unique_repo, postgres, postgres_server
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 20, 2 << 20, 3 << 20])
    first, second = start_nodes(dockmirror, registry, postgres, count=2, backoff=BACKOFF)
    cached, missed, later = image.platforms[0].layers
    status, _, _ = curl(f"{first.url}/v2/{unique_repo}/blobs/{cached.digest}")
    assert status == 200
    postgres_server.stop()
    try:
        status, _, body = curl(f"{first.url}/v2/{unique_repo}/blobs/{cached.digest}")
        assert status == 200 and sha256(body) == cached.digest
        status, _, body = curl(f"{second.url}/v2/{unique_repo}/blobs/{missed.digest}")
        assert status == 200 and sha256(body) == missed.digest
        status, _, body = curl(f"{second.url}/v2/{unique_repo}/manifests/v1")
        assert status == 200 and body == image.manifest
        # The outage is logged once, not once per fill fetched alone.
        assert second.log_text().count("fill coordinator: PostgreSQL is unavailable") == 1
    finally:
        postgres_server.start()
    time.sleep(BACKOFF)  # the nodes try PostgreSQL again after this
    for node in (first, second):
        status, _, body = curl(f"{node.url}/v2/{unique_repo}/blobs/{later.digest}")
        assert status == 200 and sha256(body) == later.digest
    assert blob_gets(registry, later.digest) == 1


def test_a_purge_revokes_the_repositorys_proofs_and_tags_for_every_node(
    registry_factory, dockmirror, seeded, unique_repo, postgres, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 10])
    layer = image.platforms[0].layers[0]
    port, authorized = free_port(), tmp_path / "authorized_keys"
    operator = test_manhole.keypair(tmp_path, "operator")
    authorized.write_text(Path(f"{operator}.pub").read_text())
    manhole = {"listen": f"tcp:{port}:interface={LOOPBACK}", "authorized_keys": str(authorized)}
    first, second = start_nodes(dockmirror, registry, postgres, count=2, first={"manhole": manhole})
    manifest, blob = f"/v2/{unique_repo}/manifests/v1", f"/v2/{unique_repo}/blobs/{layer.digest}"
    for path in (manifest, blob):
        status, _, _ = curl(first.url + path)
        assert status == 200
    gets = registry.count_requests("GET", manifest)
    heads = registry.count_requests("HEAD", f"/blobs/{layer.digest}")
    session = test_manhole.Session(port, operator)
    try:
        session.expect(">>> ")
        session.send(f'cache.purge("{unique_repo}")')
        session.expect(r"'repositories': \['hub/")
        assert session.close() == 0
    finally:
        session.close()
    # The second node finds neither the tag nor the proof: it asks the upstream.
    wait_until(lambda: not _rows(postgres, "cache_tags") and not _rows(postgres, "cache_access"))
    for path in (manifest, blob):
        status, _, _ = curl(second.url + path)
        assert status == 200
    assert registry.count_requests("GET", manifest) == gets + 1
    assert registry.count_requests("HEAD", f"/blobs/{layer.digest}") == heads + 1


def test_a_manifest_by_digest_is_fetched_once_for_the_cluster(
    registry_factory, dockmirror, seeded, unique_repo, postgres
):
    """Cold clients on three nodes: one node asks the upstream, the others copy the
    manifest from it (checked against its digest)."""
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 10])
    nodes = start_nodes(dockmirror, registry, postgres)
    path = f"/v2/{unique_repo}/manifests/{image.digest}"
    gets = registry.count_requests("GET", path)  # the seeding's
    urls = [node.url + path for node in nodes]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: curl(urls[i % NODES]), range(12)))
    for status, _, body in results:
        assert status == 200 and sha256(body) == image.digest
    upstream = registry.count_requests("GET", path) - gets
    print(f"\nupstream GETs of a manifest by digest for 12 cold clients over 3 nodes: {upstream}")
    assert upstream == 1


def test_a_purge_whose_notification_was_lost_reaches_every_node_by_polling(
    registry_factory, dockmirror, seeded, unique_repo, postgres
):
    """As from a process that was not listening, or a node of the previous version
    (whose notifications are not signed, and ignored)."""
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 10])
    layer = image.platforms[0].layers[0]
    nodes = start_nodes(dockmirror, registry, postgres, count=2)
    for node in nodes:
        status, _, body = curl(f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}")
        assert status == 200 and sha256(body) == layer.digest
        wait_until(lambda node=node: layer.digest in cached_blobs(node))
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute("INSERT INTO cache_purges (what, origin) VALUES (%s, 'lost')", (layer.digest,))
    for node in nodes:
        wait_until(lambda node=node: layer.digest not in cached_blobs(node), timeout=PURGE_POLL * 3)
        assert f"applying the purge of {layer.digest}, made on another node" in node.log_text()


def _purges_applied(node: Dockmirror) -> int:
    """The id of the last cluster purge the node applied, as its own index says."""
    with sqlite3.connect(node.cache_dir / "index.sqlite") as db:
        row = db.execute("SELECT applied FROM cluster_purges").fetchone()
    return int(row[0]) if row else 0


def test_a_node_down_during_a_purge_applies_it_once_restarted(
    registry_factory, dockmirror, seeded, unique_repo, postgres
):
    """No notification and no poll reached it; it keeps how far it applied the
    purges, so it applies this one once, not at each start."""
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 10])
    layer = image.platforms[0].layers[0]
    blob = f"/v2/{unique_repo}/blobs/{layer.digest}"
    first, second = start_nodes(dockmirror, registry, postgres, count=2)
    for node in (first, second):
        status, _, _ = curl(node.url + blob)
        assert status == 200
        wait_until(lambda node=node: layer.digest in cached_blobs(node))
    second.stop()
    with psycopg.connect(postgres, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO cache_purges (what, origin) VALUES (%s, 'elsewhere') RETURNING id",
            (layer.digest,),
        ).fetchone()
    assert row is not None
    wait_until(lambda: layer.digest not in cached_blobs(first), timeout=PURGE_POLL * 3)
    gets = blob_gets(registry, layer.digest)
    second.start()
    # Applied before it listens: its first client gets the blob from the upstream.
    status, _, body = curl(second.url + blob)
    assert status == 200 and sha256(body) == layer.digest
    assert blob_gets(registry, layer.digest) == gets + 1
    applying = f"applying the purge of {layer.digest}, made on another node"
    assert applying in second.log_text()
    # Fetched again, the blob stays through the next restart: the purge is not applied twice.
    wait_until(lambda: _purges_applied(second) >= row[0], timeout=PURGE_SETTLED + PURGE_POLL * 3)
    wait_until(lambda: layer.digest in cached_blobs(second))
    second.restart()
    time.sleep(PURGE_POLL)  # its first read of the purges is at its start
    assert layer.digest in cached_blobs(second)
    assert second.log_text().count(applying) == 1


def _rows(database: str, table: str) -> int:
    with psycopg.connect(database) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


class RogueNode:
    """A "node" serving wrong bytes of the right length for any blob, to whoever asks."""

    def __init__(self, size: int) -> None:
        body = bytes(size)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_node_checks_what_another_streams_to_it(
    registry_factory, dockmirror, seeded, unique_repo, postgres
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1 << 20])
    layer = image.platforms[0].layers[0]
    [node] = start_nodes(dockmirror, registry, postgres, count=1)
    rogue = RogueNode(layer.size)
    # The rogue holds the digest's claim and says it fills it.
    with psycopg.connect(postgres, autocommit=True) as claim:
        claim.execute("SELECT pg_advisory_lock(%s)", (lock_key(layer.digest),))
        claim.execute(
            "INSERT INTO fills (digest, node_url, size) VALUES (%s, %s, %s)",
            (layer.digest, rogue.url, layer.size),
        )
        try:
            status, body, _, _ = timed_get(f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}")
        finally:
            rogue.close()
    # The client was cut before its last byte, and nothing was kept.
    assert len(body) < layer.size
    assert "do not match" in node.log_text()
    assert layer.digest not in cached_blobs(node)
    assert_cache_sound(node)
    # The claim is free now: the node fetches the blob itself.
    status, _, got = curl(f"{node.url}/v2/{unique_repo}/blobs/{layer.digest}")
    assert status == 200 and sha256(got) == layer.digest
    assert blob_gets(registry, layer.digest) == 1
