"""The cache end to end: real registries upstream, skopeo and curl as clients."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from dockmirror.config import load
from dockmirror.service import build_service

from . import test_manhole
from .conftest import toml_document
from .images import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, pull, skopeo
from .registries import wait_until
from .relay import Fault
from .test_pull import assert_pulled, curl, error_code

MULTI_ARCH = [("linux", "amd64"), ("linux", "arm64")]


def hub_config(registry, **cache):
    upstreams = {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}}
    return upstreams, {"cache": cache} if cache else None


def mirror_for(dockmirror, registry, **cache):
    upstreams, extra = hub_config(registry, **cache)
    return dockmirror(upstreams, extra=extra)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cached_blobs(mirror) -> dict[str, int]:
    """The blob files in the mirror's cache, by digest, with their sizes."""
    root = mirror.cache_dir / "blobs"
    return {
        f"{path.parent.parent.name}:{path.name}": path.stat().st_size
        for path in root.glob("*/*/*")
        if path.is_file()
    }


def settle(mirror) -> None:
    """Wait until no fill is in progress.

    A client has every byte a moment before the fill is verified and renamed
    into place.
    """
    wait_until(lambda: not any((mirror.cache_dir / "tmp").iterdir()), timeout=10)


def assert_cache_sound(mirror) -> None:
    """Every cached file hashes to its name; no temporary file is left."""
    settle(mirror)
    for path in (mirror.cache_dir / "blobs").glob("*/*/*"):
        assert sha256(path.read_bytes()) == f"sha256:{path.name}", path


def metric(mirror, name: str) -> float:
    _, _, body = curl(f"{mirror.url}/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if re.match(rf"{name}(\{{.*\}})? ", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def copy_to_oci(reference: str, dest: Path) -> None:
    skopeo(
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--src-no-creds",
        f"docker://{reference}",
        f"oci:{dest}:image",
    )


def clients_waiting(port: int) -> int:
    """Connections to 127.0.0.1:``port`` whose request the server has read and not answered.

    From /proc/net/tcp: the server's end is established, nothing waits unread
    in its receive queue, and nothing is queued to send.
    """
    local = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        tx_queue, rx_queue = (int(q, 16) for q in fields[4].split(":"))
        if fields[1] == local and fields[3] == "01" and rx_queue == 0 and tx_queue == 0:
            count += 1
    return count


def overlapping(relay, mirror, url: str, clients: int = 8) -> list:
    """GET ``url`` from ``clients`` clients at once; the relay holds the upstream's answer
    until every one of them is in flight."""
    relay.hold()
    with ThreadPoolExecutor(clients) as pool:
        results = [pool.submit(curl, url) for _ in range(clients)]
        relay.wait_for(lambda r: r.held >= 1)
        wait_until(lambda: clients_waiting(mirror.port) >= clients, timeout=30)
        time.sleep(0.5)  # time for a mirror without single flight to ask again
        assert not any(result.done() for result in results)
        relay.release()
        return [result.result() for result in results]


def test_concurrent_cold_gets_make_one_upstream_fetch(
    plain_registry, relay, dockmirror, seeded, unique_repo
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[3_000_000])
    upstream = relay(plain_registry)
    upstream.faults.append(Fault(r"^GET /v2/.*/(manifests|blobs)/", hold=True))
    mirror = mirror_for(dockmirror, upstream)
    manifest_url = f"{mirror.url}/v2/{unique_repo}/manifests/v1"
    results = overlapping(upstream, mirror, manifest_url)
    assert [(status, body) for status, _, body in results] == [(200, image.manifest)] * 8
    assert upstream.count(f"^GET /v2/{unique_repo}/manifests/v1 ") == 1
    layer = image.platforms[0].layers[0]
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    results = overlapping(upstream, mirror, url)
    for status, _, body in results:
        assert status == 200
        assert sha256(body) == layer.digest
    assert upstream.count(f"^GET /v2/{unique_repo}/blobs/{layer.digest} ") == 1
    assert plain_registry.count_requests("GET", f"/blobs/{layer.digest}") == 1
    settle(mirror)
    assert cached_blobs(mirror)[layer.digest] == layer.size
    # Served again from the cache, whole and in part.
    status, headers, body = curl(url)
    assert (status, headers["x-cache"], sha256(body)) == (200, "HIT", layer.digest)
    status, headers, body = curl("-H", "Range: bytes=10-19", url)
    assert status == 206
    assert headers["content-range"] == f"bytes 10-19/{layer.size}"
    assert body == layer_bytes(plain_registry, layer)[10:20]
    assert plain_registry.count_requests("GET", f"/blobs/{layer.digest}") == 1


def layer_bytes(registry, blob) -> bytes:
    """The blob as the registry stores it."""
    return registry.storage_path_of_blob(blob.digest).read_bytes()


def test_corrupted_upstream_blob_is_neither_delivered_nor_cached(
    plain_registry, dockmirror, seeded, unique_repo
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[500_000])
    mirror = mirror_for(dockmirror, plain_registry)
    layer = image.platforms[0].layers[0]
    stored = plain_registry.storage_path_of_blob(layer.digest)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    result = subprocess.run(
        ["curl", "-s", "--noproxy", "*", "--max-time", "30", "-o", "/dev/null", url],
        check=False,
    )
    assert result.returncode == 18  # a partial transfer: the connection was cut
    assert layer.digest not in cached_blobs(mirror)
    assert_cache_sound(mirror)
    assert metric(mirror, "dockmirror_digest_mismatches_total") == 1


def test_quota_holds_by_evicting_the_least_recently_used(
    plain_registry, dockmirror, seeded, unique_repo, tmp_path
):
    quota = 1 << 20
    mirror = mirror_for(dockmirror, plain_registry, max_size="1MiB")
    images = [
        seeded(plain_registry, f"{unique_repo}-{i}", "v1", layers=[400_000]) for i in range(4)
    ]
    ever_cached: set[str] = set()
    for i, image in enumerate(images):
        pull_dir = tmp_path / f"out{i}"
        skopeo_pull(mirror, f"{unique_repo}-{i}:v1", pull_dir)
        assert_pulled(pull_dir, image)
        settle(mirror)
        assert sum(cached_blobs(mirror).values()) <= quota
        ever_cached |= set(cached_blobs(mirror))
    cached = cached_blobs(mirror)
    assert images[-1].platforms[0].layers[0].digest in cached
    assert images[0].platforms[0].layers[0].digest not in cached
    # Every blob that left the cache was evicted, and counted once.
    evicted = ever_cached - set(cached)
    assert len(evicted) >= 2
    assert metric(mirror, "dockmirror_cache_evictions_total") == len(evicted)
    assert_cache_sound(mirror)


def skopeo_pull(mirror, name: str, dest: Path) -> None:
    pull(f"{mirror.host}/{name}", dest)


def test_oversize_layers_pass_through_uncached(
    plain_registry, dockmirror, seeded, unique_repo, tmp_path
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[1000, 300_000])
    mirror = mirror_for(dockmirror, plain_registry, max_layer_size="100KiB")
    big = image.platforms[0].layers[1]
    small = image.platforms[0].layers[0]
    for attempt in range(2):
        skopeo_pull(mirror, f"{unique_repo}:v1", tmp_path / f"out{attempt}")
        assert_pulled(tmp_path / f"out{attempt}", image)
    cached = cached_blobs(mirror)
    assert small.digest in cached and big.digest not in cached
    assert plain_registry.count_requests("GET", f"/blobs/{small.digest}") == 1
    assert plain_registry.count_requests("GET", f"/blobs/{big.digest}") == 2
    status, headers, body = curl(f"{mirror.url}/v2/{unique_repo}/blobs/{big.digest}")
    assert (status, headers["x-cache"], sha256(body)) == (200, "MISS", big.digest)
    metrics = curl(f"{mirror.url}/metrics")[2].decode()
    received = re.search(
        r'dockmirror_upstream_received_bytes_total\{upstream="hub"\} (\S+)', metrics
    )
    # Blob bodies: the big layer three times, the small one and the config once.
    config = image.platforms[0].config
    assert received and float(received.group(1)) == 3 * big.size + small.size + config.size
    # A range passes through as the registry's 206, which must be the range asked for.
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{big.digest}"
    status, headers, body = curl("-H", "Range: bytes=10-19", url)
    assert (status, headers["content-range"], len(body)) == (206, f"bytes 10-19/{big.size}", 10)


def test_oversize_layers_rejected(plain_registry, dockmirror, seeded, unique_repo):
    image = seeded(plain_registry, unique_repo, "v1", layers=[300_000])
    mirror = mirror_for(dockmirror, plain_registry, max_layer_size="100KiB", oversize="reject")
    big = image.platforms[0].layers[0]
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{big.digest}"
    status, _, body = curl(url)
    assert status == 403 and error_code(body) == "DENIED"
    assert "max_layer_size" in body.decode()
    status, _, _ = curl(url, method="HEAD")
    assert status == 403
    assert plain_registry.count_requests("GET", f"/blobs/{big.digest}") == 0


def test_restart_keeps_the_cache_and_a_stopped_upstream_still_serves(
    registry_factory, dockmirror, seeded, unique_repo, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[2000, 200_000], platforms=MULTI_ARCH)
    mirror = mirror_for(dockmirror, registry)
    copy_to_oci(f"{mirror.host}/{unique_repo}:v1", tmp_path / "first")
    mirror.restart()
    registry.stop()
    copy_to_oci(f"{mirror.host}/{unique_repo}:v1", tmp_path / "second")
    index = (tmp_path / "second" / "index.json").read_text()
    assert image.digest in index
    for blob in image.blobs:
        path = tmp_path / "second" / "blobs" / "sha256" / blob.digest.split(":")[1]
        assert sha256(path.read_bytes()) == blob.digest
    status, headers, _ = curl(
        "-H", f"Accept: {OCI_INDEX}", f"{mirror.url}/v2/{unique_repo}/manifests/v1"
    )
    assert (status, headers["x-cache"]) == (200, "HIT")
    # What was never cached gets a clear error while the upstream is down.
    status, _, body = curl(f"{mirror.url}/v2/{unique_repo}/manifests/v2")
    assert status == 503 and error_code(body) == "UNAVAILABLE"


def test_expired_tags_are_revalidated_or_served_stale(
    registry_factory, dockmirror, seeded, unique_repo
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1")
    mirror = mirror_for(dockmirror, registry, manifest_ttl=0)
    url = f"{mirror.url}/v2/{unique_repo}/manifests/v1"
    accept = ("-H", f"Accept: {image.media_type}")
    assert curl(*accept, url)[1]["x-cache"] == "MISS"
    status, headers, body = curl(*accept, url)
    assert (status, headers["x-cache"], body) == (200, "REVALIDATED", image.manifest)
    assert registry.count_requests("GET", "/manifests/v1") == 1
    assert registry.count_requests("HEAD", "/manifests/v1") == 1
    registry.stop()
    status, headers, body = curl(*accept, url)
    assert (status, headers["x-cache"], body) == (200, "STALE", image.manifest)
    # A retag upstream is noticed at the next revalidation.
    registry.start()
    newer = seeded(registry, unique_repo, "v1", layers=[1500])
    status, headers, body = curl(*accept, url)
    assert (status, headers["x-cache"], body) == (200, "MISS", newer.manifest)


def test_clients_with_different_accept_each_get_what_they_asked_for(
    plain_registry, dockmirror, seeded, unique_repo
):
    image = seeded(plain_registry, unique_repo, "v1", platforms=MULTI_ARCH, docker_media_types=True)
    amd64 = image.platforms[0]
    mirror = mirror_for(dockmirror, plain_registry)
    url = f"{mirror.url}/v2/{unique_repo}/manifests/v1"
    for expected in ("MISS", "HIT"):
        # A client that takes lists gets the list; one that doesn't gets what
        # the upstream picks for it (the linux/amd64 manifest).
        status, headers, body = curl("-H", f"Accept: {DOCKER_MANIFEST_LIST}", url)
        assert (status, headers["x-cache"], body) == (200, expected, image.manifest)
        assert headers["content-type"] == DOCKER_MANIFEST_LIST
        status, headers, body = curl("-H", f"Accept: {DOCKER_MANIFEST}", url)
        assert (status, headers["x-cache"], body) == (200, expected, amd64.manifest)
        assert headers["content-type"] == DOCKER_MANIFEST
        assert headers["docker-content-digest"] == amd64.digest
    assert plain_registry.count_requests("GET", f"{unique_repo}/manifests/v1") == 2
    status, headers, _ = curl("-H", f"Accept: {DOCKER_MANIFEST_LIST}", url, method="HEAD")
    assert (status, headers["x-cache"]) == (200, "HIT")
    assert int(headers["content-length"]) == len(image.manifest)


def test_blob_cached_through_one_upstream_does_not_leak_to_another(
    plain_registry, registry_factory, dockmirror, seeded, unique_repo
):
    other = registry_factory()
    image = seeded(plain_registry, unique_repo, "v1")
    seeded(other, unique_repo, "v1")
    mirror = dockmirror(
        {
            "public": {"plugin": "registry", "url": plain_registry.url, "default": True},
            "private": {"plugin": "registry", "url": other.url, "aliases": ["private.test"]},
        }
    )
    layer = image.platforms[0].layers[0]
    status, _, body = curl(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
    assert status == 200 and sha256(body) == layer.digest
    status, _, body = curl(f"{mirror.url}/v2/private.test/{unique_repo}/blobs/{layer.digest}")
    assert status == 404 and error_code(body) == "BLOB_UNKNOWN"
    accept = ("-H", f"Accept: {image.media_type}")
    status, headers, body = curl(*accept, f"{mirror.url}/v2/{unique_repo}/manifests/{image.digest}")
    assert (status, body) == (200, image.manifest)
    assert headers["docker-content-digest"] == image.digest
    status, _, body = curl(
        *accept, f"{mirror.url}/v2/private.test/{unique_repo}/manifests/{image.digest}"
    )
    assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN"


def test_kill_9_mid_fill_leaves_nothing_corrupt(
    registry_factory, relay, dockmirror, seeded, unique_repo, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[4 << 20])
    layer = image.platforms[0].layers[0]
    upstream = relay(registry)
    # The fill takes about 4 s: the kill lands while the file grows.
    upstream.faults.append(Fault(r"/blobs/", rate=1 << 20))
    mirror = mirror_for(dockmirror, upstream)
    client = subprocess.Popen(
        [
            "curl",
            "-s",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}",
        ]
    )
    temp = mirror.cache_dir / "tmp"
    try:
        wait_until(lambda: any(p.stat().st_size > 1 << 20 for p in temp.iterdir()), timeout=10)
        [partial] = temp.iterdir()
        assert partial.stat().st_size < layer.size
        mirror.kill9()
    finally:
        client.wait()
    assert client.returncode == 18  # the client got a partial transfer
    assert layer.digest not in cached_blobs(mirror)
    upstream.faults.clear()
    mirror.start()
    assert_cache_sound(mirror)
    skopeo_pull(mirror, f"{unique_repo}:v1", tmp_path / "out")
    assert_pulled(tmp_path / "out", image)
    settle(mirror)
    assert cached_blobs(mirror)[layer.digest] == layer.size
    assert_cache_sound(mirror)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_x_cache_on_blob_responses(plain_registry, dockmirror, seeded, unique_repo, method):
    image = seeded(plain_registry, unique_repo, "v1")
    mirror = mirror_for(dockmirror, plain_registry)
    layer = image.platforms[0].layers[0]
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    status, headers, _ = curl(url, method=method)
    assert (status, headers["x-cache"]) == (200, "MISS")
    assert int(headers["content-length"]) == layer.size
    curl(url)
    status, headers, _ = curl(url, method=method)
    assert (status, headers["x-cache"]) == (200, "HIT")
    assert int(headers["content-length"]) == layer.size


def test_if_range_other_than_the_blob_etag_gets_the_whole_blob(
    plain_registry, dockmirror, seeded, unique_repo
):
    image = seeded(plain_registry, unique_repo, "v1")
    mirror = mirror_for(dockmirror, plain_registry)
    layer = image.platforms[0].layers[0]
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    curl(url)
    ranged = ("-H", "Range: bytes=10-19", url)
    status, _, body = curl("-H", f'If-Range: "{layer.digest}"', *ranged)
    assert (status, len(body)) == (206, 10)
    for validator in ('"sha256:other"', "Wed, 21 Oct 2015 07:28:00 GMT"):
        status, headers, body = curl("-H", f"If-Range: {validator}", *ranged)
        assert (status, sha256(body)) == (200, layer.digest)
        assert "content-range" not in headers


@pytest_twisted.ensureDeferred
async def test_prefetch_warms_every_platform(plain_registry, seeded, unique_repo, tmp_path):
    image = seeded(plain_registry, unique_repo, "v1", layers=[1000, 5000], platforms=MULTI_ARCH)
    config_path = tmp_path / "dockmirror.toml"
    config_path.write_text(
        toml_document(
            {
                "server": {"listen": ["tcp:0:interface=127.0.0.1"]},
                "cache": {"directory": str(tmp_path / "cache")},
                "upstreams": {
                    "hub": {"plugin": "registry", "url": plain_registry.url, "default": True}
                },
            }
        )
    )
    top = build_service(load(str(config_path)), reactor)
    top.startService()
    try:
        cache = top.getServiceNamed("cache")
        summary = await cache.prefetch(f"{unique_repo}:v1")
        again = await cache.prefetch(f"{unique_repo}:v1")
    finally:
        await top.stopService()
    assert summary["manifests"] == 3 and summary["blobs"] == len(image.blobs) == 6
    assert summary["errors"] == [] and summary["already_cached"] == 0
    assert summary["fetched_bytes"] == sum(b.size for b in image.blobs)
    assert again["already_cached"] == 6 and again["fetched_bytes"] == 0
    for blob in image.blobs:
        assert plain_registry.count_requests("GET", f"/blobs/{blob.digest}") == 1
    for digest in (image.digest, *(p.digest for p in image.platforms)):
        assert (tmp_path / "cache" / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()


manhole = test_manhole.manhole


def test_the_operator_shell(manhole, plain_registry, seeded, unique_repo, tmp_path):
    image = seeded(plain_registry, unique_repo, "v1", layers=[1000, 2000])
    mirror, port, authorized = manhole
    operator = test_manhole.keypair(tmp_path, "operator")
    authorized.write_text(Path(f"{operator}.pub").read_text())
    session = test_manhole.Session(port, operator)
    try:
        session.expect(">>> ")
        session.send("cache")
        session.expect(r"<cache \S+: 0 blobs, 0 bytes, 0 fills; stats\(\)")
        session.send(f'cache.prefetch("{unique_repo}:v1")')
        session.expect(r"Deferred #0 called back: \{'image': .*'manifests': 1, 'blobs': 3,")
        session.send("cache.stats()['blobs']")
        session.expect(r"\n4\r?\n")
        session.send(f'cache.purge("{unique_repo}")')
        session.expect(r"\{'repositories': \['hub/" + re.escape(unique_repo) + r"'\], 'tags': 1")
        assert session.close() == 0
    finally:
        session.close()
    assert not any(blob.digest in cached_blobs(mirror) for blob in image.blobs)
