"""``[storage] backend = "s3"``: nodes sharing a Ceph RGW bucket below their cache directories.

Every node is a real ``twistd`` process with its own cache directory; the
upstream is a real ``docker-registry``, whose access log counts the blob
GETs that reached it.
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .ceph import S3Bucket
from .conftest import Dockmirror, DockmirrorFactory
from .images import pull
from .registries import Registry, free_port, wait_until
from .relay import Fault
from .test_cache import assert_cache_sound, cached_blobs, metric, settle, sha256
from .test_pull import assert_pulled, curl, error_code

#: Over one upload part (8 MiB): stored with a multipart upload.
BIG = 12 << 20


def node(
    dockmirror: DockmirrorFactory,
    registry: Registry,
    s3: S3Bucket,
    cache: dict[str, object] | None = None,
    **storage: object,
) -> Dockmirror:
    """A node mirroring *registry* with the bucket *s3* as its shared tier."""
    return dockmirror(
        {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}},
        extra={"storage": s3.storage_table(**storage), **({"cache": cache} if cache else {})},
    )


def objects(s3: S3Bucket, prefix: str = "") -> dict[str, int]:
    """The bucket's objects under *prefix*, by key, with their sizes."""
    answer = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)  # type: ignore[attr-defined]
    return {item["Key"]: item["Size"] for item in answer.get("Contents", [])}


def uploads(s3: S3Bucket) -> list[str]:
    """Keys of the bucket's incomplete multipart uploads."""
    answer = s3.client().list_multipart_uploads(Bucket=s3.bucket)  # type: ignore[attr-defined]
    return [item["Key"] for item in answer.get("Uploads", [])]


def stored(s3: S3Bucket, digest: str, prefix: str = "") -> bytes | None:
    key = f"{prefix}blobs/sha256/{digest.partition(':')[2]}"
    if key not in objects(s3, prefix):
        return None
    answer = s3.client().get_object(Bucket=s3.bucket, Key=key)  # type: ignore[attr-defined]
    return bytes(answer["Body"].read())


def fetch(url: str) -> subprocess.Popen[bytes]:
    """A curl client GETting *url* into nothing, in the background."""
    return subprocess.Popen(
        ["curl", "-s", "--noproxy", "*", "--max-time", "60", "-o", "/dev/null", url]
    )


def blob_gets(registry: Registry, digest: str) -> int:
    return registry.count_requests("GET", f"/blobs/{digest}")


def test_pulled_blobs_land_in_the_bucket_and_another_node_serves_them_without_the_upstream(
    registry_factory, dockmirror, seeded, unique_repo, s3, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[BIG, 100_000])
    big, small = image.platforms[0].layers
    first = node(dockmirror, registry, s3, prefix="mirror/")
    pull(f"{first.host}/{unique_repo}:v1", tmp_path / "first")
    assert_pulled(tmp_path / "first", image)
    settle(first)
    blobs = [*image.platforms[0].layers, image.platforms[0].config]
    wait_until(lambda: len(objects(s3, "mirror/blobs/")) == len(blobs) + 1, timeout=30)
    for blob in blobs:
        assert stored(s3, blob.digest, "mirror/") == (
            registry.storage_path_of_blob(blob.digest).read_bytes()
        )
    assert stored(s3, image.digest, "mirror/") == image.manifest
    assert uploads(s3) == []
    assert all(key.startswith("mirror/blobs/sha256/") for key in objects(s3))

    # A second node, its cache directory empty: the bucket answers, the upstream sends nothing.
    second = node(dockmirror, registry, s3, prefix="mirror/")
    url = f"{second.url}/v2/{unique_repo}/blobs/{big.digest}"
    status, headers, body = curl(url)
    assert (status, sha256(body)) == (200, big.digest)
    assert (headers["x-cache"], headers["x-cache-tier"]) == ("HIT", "shared")
    settle(second)
    assert cached_blobs(second)[big.digest] == big.size  # the local tier is filled on the way
    status, headers, body = curl(url)
    assert (status, headers["x-cache"], sha256(body)) == (200, "HIT", big.digest)
    assert "x-cache-tier" not in headers  # a local hit
    # A manifest by digest too: the upstream is asked with a HEAD only.
    manifest_gets = registry.count_requests("GET", f"/manifests/{image.digest}")
    accept = ("-H", f"Accept: {image.media_type}")
    status, headers, body = curl(*accept, f"{second.url}/v2/{unique_repo}/manifests/{image.digest}")
    assert (status, body, headers["x-cache-tier"]) == (200, image.manifest, "shared")
    assert registry.count_requests("GET", f"/manifests/{image.digest}") == manifest_gets
    assert registry.count_requests("HEAD", f"/manifests/{image.digest}") >= 1
    pull(f"{second.host}/{unique_repo}:v1", tmp_path / "second")
    assert_pulled(tmp_path / "second", image)
    assert_cache_sound(second)
    for blob in blobs:
        assert blob_gets(registry, blob.digest) == 1, blob
    assert blob_gets(registry, small.digest) == 1


def filled(dockmirror, registry, s3, repository: str, blob) -> Dockmirror:
    """A node that fetched *blob* of *repository* from the upstream, now in the bucket."""
    mirror = node(dockmirror, registry, s3)
    status, headers, _ = curl(f"{mirror.url}/v2/{repository}/blobs/{blob.digest}")
    assert (status, headers["x-cache"]) == (200, "MISS")
    wait_until(lambda: stored(s3, blob.digest) is not None, timeout=30)
    return mirror


def test_a_node_whose_cache_was_wiped_serves_hits_from_the_bucket(
    registry_factory, dockmirror, seeded, unique_repo, s3
):
    registry = registry_factory()
    # Over [upstreams] parallel_min_size: fetched, and filled again, in ranges.
    image = seeded(registry, unique_repo, "v1", layers=[40 << 20])
    layer = image.platforms[0].layers[0]
    mirror = filled(dockmirror, registry, s3, unique_repo, layer)
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    mirror.stop()
    shutil.rmtree(mirror.cache_dir)
    mirror.start()
    status, headers, body = curl(url)
    assert (status, sha256(body), headers.get("x-cache-tier")) == (200, layer.digest, "shared")
    # A range of a blob in the bucket only.
    shutil.rmtree(mirror.cache_dir / "blobs")
    mirror.restart()
    status, headers, body = curl("-H", "Range: bytes=100-199", url)
    assert status == 206
    assert body == registry.storage_path_of_blob(layer.digest).read_bytes()[100:200]
    assert blob_gets(registry, layer.digest) == 1


def test_a_corrupt_object_is_never_served_and_is_replaced(
    registry_factory, dockmirror, seeded, unique_repo, s3
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[300_000])
    layer = image.platforms[0].layers[0]
    key = f"blobs/sha256/{layer.digest.partition(':')[2]}"
    data = bytearray(registry.storage_path_of_blob(layer.digest).read_bytes())
    data[-1] ^= 0xFF
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))  # type: ignore[attr-defined]
    mirror = node(dockmirror, registry, s3)
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    assert fetch(url).wait() == 18  # cut before the last byte
    settle(mirror)
    assert cached_blobs(mirror) == {}
    wait_until(lambda: stored(s3, layer.digest) is None, timeout=10)  # deleted
    status, headers, body = curl(url)
    assert (status, headers["x-cache"], sha256(body)) == (200, "MISS", layer.digest)
    wait_until(lambda: stored(s3, layer.digest) is not None, timeout=30)
    assert sha256(stored(s3, layer.digest) or b"") == layer.digest
    assert blob_gets(registry, layer.digest) == 1


def test_a_blob_larger_than_the_local_tier_streams_from_the_bucket(
    registry_factory, dockmirror, seeded, unique_repo, s3
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[3_000_000])
    layer = image.platforms[0].layers[0]
    filled(dockmirror, registry, s3, unique_repo, layer)
    small = node(dockmirror, registry, s3, cache={"max_size": "1MiB"})
    url = f"{small.url}/v2/{unique_repo}/blobs/{layer.digest}"
    status, headers, body = curl(url)
    assert (status, sha256(body), headers["x-cache-tier"]) == (200, layer.digest, "shared")
    status, headers, body = curl("-H", "Range: bytes=1000-", url)
    assert (status, headers["content-range"]) == (206, f"bytes 1000-{layer.size - 1}/{layer.size}")
    assert body == registry.storage_path_of_blob(layer.digest).read_bytes()[1000:]
    assert cached_blobs(small) == {}
    assert blob_gets(registry, layer.digest) == 1


def rss(pid: int) -> int:
    """The resident memory of process *pid*, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_slow_client_pauses_the_read_from_the_bucket(
    registry_factory, dockmirror, seeded, unique_repo, s3
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[48 << 20])
    layer = image.platforms[0].layers[0]
    filled(dockmirror, registry, s3, unique_repo, layer)
    small = node(dockmirror, registry, s3, cache={"max_size": "1MiB"})
    before = rss(small.pid)
    with socket.create_connection(("127.0.0.1", small.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        request = f"GET /v2/{unique_repo}/blobs/{layer.digest} HTTP/1.1\r\nHost: x\r\n\r\n"
        client.sendall(request.encode())
        head = client.recv(4096)
        assert b"X-Cache-Tier: shared" in head
        time.sleep(3)  # the client reads nothing: the node must not buffer the blob
        assert rss(small.pid) - before < 16 << 20
        data = head.partition(b"\r\n\r\n")[2]
        hasher = hashlib.sha256(data)
        received = len(data)
        while received < layer.size:
            chunk = client.recv(1 << 20)
            assert chunk
            hasher.update(chunk)
            received += len(chunk)
    assert received == layer.size and f"sha256:{hasher.hexdigest()}" == layer.digest


def test_redirect_answers_307_to_a_presigned_url_that_skopeo_follows(
    registry_factory, dockmirror, seeded, unique_repo, s3, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[BIG])
    layer = image.platforms[0].layers[0]
    filled(dockmirror, registry, s3, unique_repo, layer)

    redirecting = node(dockmirror, registry, s3, redirect=True)
    url = f"{redirecting.url}/v2/{unique_repo}/blobs/{layer.digest}"
    status, headers, _ = curl(url)
    assert status == 307
    location = headers["location"]
    assert location.startswith(f"{s3.endpoint}/{s3.bucket}/blobs/sha256/")
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=" in location
    status, _, body = curl(location)
    assert (status, sha256(body)) == (200, layer.digest)
    # HEAD is answered directly.
    status, headers, _ = curl(url, method="HEAD")
    assert (status, int(headers["content-length"])) == (200, layer.size)
    # A repository that does not have the blob gets no redirect.
    status, _, body = curl(f"{redirecting.url}/v2/{unique_repo}-other/blobs/{layer.digest}")
    assert (status, error_code(body)) == (404, "BLOB_UNKNOWN")
    pull(f"{redirecting.host}/{unique_repo}:v1", tmp_path / "redirected")
    assert_pulled(tmp_path / "redirected", image)
    assert layer.digest not in cached_blobs(redirecting)  # the bytes never went through it
    assert blob_gets(registry, layer.digest) == 1


def test_the_bucket_quota_holds_by_evicting_the_least_recently_used(
    registry_factory, dockmirror, seeded, unique_repo, s3, tmp_path
):
    registry = registry_factory()
    quota = 1 << 20
    mirror = node(dockmirror, registry, s3, max_size="1MiB")
    images = [seeded(registry, f"{unique_repo}-{i}", "v1", layers=[400_000]) for i in range(4)]
    ever: set[str] = set()
    for i, image in enumerate(images):
        pull(f"{mirror.host}/{unique_repo}-{i}:v1", tmp_path / f"out{i}")
        layer = image.platforms[0].layers[0]
        wait_until(lambda layer=layer: stored(s3, layer.digest) is not None, timeout=30)
        wait_until(lambda: sum(objects(s3).values()) <= quota, timeout=10)
        ever |= set(objects(s3))
    held = objects(s3)
    first, last = (image.platforms[0].layers[0].digest.partition(":")[2] for image in images[::3])
    assert f"blobs/sha256/{last}" in held
    assert f"blobs/sha256/{first}" not in held
    evicted = ever - set(held)
    assert len(evicted) >= 2
    # Every object stored is still held or was evicted, and counted once.
    evictions = metric(mirror, "dockmirror_storage_evictions_total")
    assert evictions >= len(evicted)
    assert metric(mirror, "dockmirror_storage_uploads_total") == evictions + len(held)


def test_a_fill_cut_mid_way_leaves_no_object_and_its_upload_is_swept(
    registry_factory, relay, dockmirror, seeded, unique_repo, s3, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[BIG + (6 << 20)])
    layer = image.platforms[0].layers[0]
    upstream = relay(registry)
    upstream.faults.append(Fault(r"/blobs/", rate=4 << 20))
    mirror = node(dockmirror, upstream, s3, stale_uploads="1s")  # type: ignore[arg-type]
    client = fetch(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
    try:
        # A part is uploaded once the first 8 MiB are written: the upload exists.
        wait_until(lambda: uploads(s3) != [], timeout=20, interval=0.1)
        mirror.kill9()
    finally:
        client.wait()
    assert client.returncode == 18
    assert uploads(s3) == [f"blobs/sha256/{layer.digest.partition(':')[2]}"]
    assert objects(s3) == {}
    time.sleep(1.5)
    upstream.faults.clear()
    mirror.start()  # its sweep aborts the dead fill's upload
    wait_until(lambda: uploads(s3) == [], timeout=20)
    assert objects(s3) == {}
    pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "out")
    assert_pulled(tmp_path / "out", image)
    wait_until(lambda: stored(s3, layer.digest) is not None, timeout=30)
    assert sha256(stored(s3, layer.digest) or b"") == layer.digest


def test_an_upstream_cut_aborts_the_upload_at_once(
    registry_factory, relay, dockmirror, seeded, unique_repo, s3
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[BIG])
    layer = image.platforms[0].layers[0]
    upstream = relay(registry)
    upstream.faults.append(Fault(r"^GET .*/blobs/", cut_after=10 << 20))
    mirror = node(dockmirror, upstream, s3)
    assert fetch(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}").wait() == 18
    settle(mirror)
    wait_until(lambda: uploads(s3) == [], timeout=20)
    assert objects(s3) == {}
    assert "not stored in the storage bucket" in mirror.log_text()


def test_a_corrupted_upstream_blob_is_never_stored(
    registry_factory, dockmirror, seeded, unique_repo, s3
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[BIG])
    layer = image.platforms[0].layers[0]
    path = registry.storage_path_of_blob(layer.digest)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # past the first parts, which are uploaded before the end is known
    path.write_bytes(bytes(data))
    mirror = node(dockmirror, registry, s3)
    assert fetch(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}").wait() == 18
    settle(mirror)
    wait_until(lambda: "not stored in the storage bucket" in mirror.log_text(), timeout=20)
    assert uploads(s3) == []
    assert objects(s3) == {}


def test_credentials_from_the_environment(registry_factory, dockmirror, seeded, unique_repo, s3):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[1000])
    layer = image.platforms[0].layers[0]
    storage = s3.storage_table()
    del storage["access_key"], storage["secret_key"]
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}},
        extra={"storage": storage},
        env={
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    )
    assert curl(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")[0] == 200
    wait_until(lambda: stored(s3, layer.digest) is not None, timeout=30)


class Failing(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with a 503."""

    def _fail(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _fail

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def failing_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("failure", ["unreachable", "5xx"])
def test_a_bucket_unreachable_or_failing_falls_back_to_the_upstream(
    registry_factory, dockmirror, seeded, unique_repo, s3, tmp_path, failing_endpoint, failure
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[300_000])
    layer = image.platforms[0].layers[0]
    endpoint = failing_endpoint if failure == "5xx" else f"http://127.0.0.1:{free_port()}"
    mirror = node(dockmirror, registry, s3, endpoint=endpoint)
    pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "out")
    assert_pulled(tmp_path / "out", image)
    assert "unavailable" in mirror.log_text() and "comes from the upstream" in mirror.log_text()
    status, headers, body = curl(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
    assert (status, headers["x-cache"], sha256(body)) == (200, "HIT", layer.digest)
    assert blob_gets(registry, layer.digest) == 1
    assert_cache_sound(mirror)
