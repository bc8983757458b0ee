"""The cache and the pull path under attack: real mirror, real registries, curl."""

from __future__ import annotations

import http.client
import json
import resource
import stat
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .images import DOCKER_MANIFEST
from .registries import LOOPBACK, free_port, wait_until
from .test_cache import cached_blobs, metric, sha256
from .test_pull import curl, error_code

FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def put_manifest(registry, repo: str, tag: str, manifest: dict) -> str:
    """Push a hand-made Docker manifest straight to a registry; returns its digest."""
    body = json.dumps(manifest).encode()
    request = urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/{tag}",
        data=body,
        method="PUT",
        headers={"Content-Type": DOCKER_MANIFEST},
    )
    with _opener.open(request, timeout=10) as response:
        assert response.status == 201
    return sha256(body)


def mount_blob(registry, digest: str, source: str, target: str) -> None:
    """Link a blob of one repository into another (a cross-repository mount)."""
    request = urllib.request.Request(
        f"{registry.url}/v2/{target}/blobs/uploads/?mount={digest}&from={source}",
        data=b"",
        method="POST",
    )
    with _opener.open(request, timeout=10) as response:
        assert response.status == 201


def descriptor(blob) -> dict:
    return {"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}


# --- a blob leaks across upstreams through a stale vouch ---------------------------


def test_a_manifest_naming_another_upstreams_blob_never_opens_it(
    registry_factory, dockmirror, seeded, unique_repo
):
    public, private = registry_factory(), registry_factory()
    secret = seeded(private, unique_repo, "v1").platforms[0].layers[0]
    # Repository A on the public upstream P names D, a blob only the private Q holds.
    base = seeded(public, unique_repo, "base", docker_media_types=True).platforms[0]
    foreign = {**descriptor(secret), "mediaType": FOREIGN_LAYER}
    foreign["urls"] = ["https://layers.example.invalid/blob"]
    put_manifest(
        public,
        unique_repo,
        "foreign",
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": descriptor(base.config),
            "layers": [foreign],
        },
    )
    mirror = dockmirror(
        {
            "public": {"plugin": "registry", "url": public.url, "default": True},
            "private": {"plugin": "registry", "url": private.url, "aliases": ["private.test"]},
        }
    )
    # The manifest is pulled through P while D is not cached yet ...
    status, _, _ = curl(f"{mirror.url}/v2/{unique_repo}/manifests/foreign")
    assert status == 200
    # ... then a user of Q pulls D, and it is cached ...
    status, _, body = curl(f"{mirror.url}/v2/private.test/{unique_repo}/blobs/{secret.digest}")
    assert status == 200 and sha256(body) == secret.digest
    wait_until(lambda: secret.digest in cached_blobs(mirror))
    # ... and P, which never had D, does not get it.
    for method in ("GET", "HEAD"):
        status, headers, body = curl(
            f"{mirror.url}/v2/{unique_repo}/blobs/{secret.digest}", method=method
        )
        assert status == 404, (method, headers)
        if method == "GET":
            assert error_code(body) == "BLOB_UNKNOWN"
    assert public.count_requests("HEAD", f"/blobs/{secret.digest}") >= 1


# --- size hints are global and poisonable ---------------------------------------


@pytest.mark.parametrize("oversize", ["reject", "passthrough"])
def test_a_poisoned_size_in_another_manifest_does_not_block_the_real_blob(
    plain_registry, dockmirror, seeded, unique_repo, oversize
):
    alpine = seeded(plain_registry, unique_repo, "3", docker_media_types=True).platforms[0]
    layer = alpine.layers[0]
    other = f"{unique_repo}-other"
    for blob in (alpine.config, layer):
        mount_blob(plain_registry, blob.digest, unique_repo, other)
    put_manifest(
        plain_registry,
        other,
        "latest",
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": descriptor(alpine.config),
            "layers": [{**descriptor(layer), "size": 10_000_000_000_000}],
        },
    )
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}},
        extra={"cache": {"max_layer_size": "100KiB", "oversize": oversize}},
    )
    assert curl(f"{mirror.url}/v2/{unique_repo}/manifests/3")[0] == 200
    assert curl(f"{mirror.url}/v2/{other}/manifests/latest")[0] == 200
    for repository in (unique_repo, other):
        url = f"{mirror.url}/v2/{repository}/blobs/{layer.digest}"
        status, headers, body = curl(url)
        assert status == 200, body
        assert sha256(body) == layer.digest
        assert int(headers["content-length"]) == layer.size
        status, headers, _ = curl(url, method="HEAD")
        assert (status, int(headers["content-length"])) == (200, layer.size)
    wait_until(lambda: cached_blobs(mirror).get(layer.digest) == layer.size)


# --- a transient I/O error deletes good blobs -------------------------------------


def test_running_out_of_file_descriptors_keeps_the_cached_blob(
    plain_registry, dockmirror, seeded, unique_repo
):
    image = seeded(plain_registry, unique_repo, "v1")
    layer = image.platforms[0].layers[0]
    mirror = dockmirror({"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}})
    path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    assert curl(f"{mirror.url}{path}")[0] == 200
    # Committed: renamed into place, and counted in the cache's size.
    wait_until(lambda: metric(mirror, "dockmirror_cache_size_bytes") >= layer.size)
    connection = http.client.HTTPConnection(LOOPBACK, mirror.port, timeout=10)
    limits = resource.prlimit(mirror.pid, resource.RLIMIT_NOFILE)
    try:
        connection.request("GET", "/v2/")
        assert connection.getresponse().read() == b"{}"
        # Every descriptor the mirror opens now is past its limit: EMFILE.
        resource.prlimit(mirror.pid, resource.RLIMIT_NOFILE, (3, limits[1]))
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    finally:
        resource.prlimit(mirror.pid, resource.RLIMIT_NOFILE, limits)
        connection.close()
    assert response.status == 503 and error_code(body) == "UNAVAILABLE"
    assert layer.digest in cached_blobs(mirror)
    status, headers, body = curl(f"{mirror.url}{path}")
    assert (status, headers["x-cache"], sha256(body)) == (200, "HIT", layer.digest)
    assert plain_registry.count_requests("GET", f"/blobs/{layer.digest}") == 1


def test_the_open_files_limit_is_raised_to_the_hard_limit_at_start(dockmirror):
    upstream = {"plugin": "registry", "url": f"http://{LOOPBACK}:{free_port()}", "default": True}
    mirror = dockmirror({"hub": upstream}, start=False)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = min(256, hard)
    mirror.wrap(["prlimit", f"--nofile={soft}:{hard}", "--"])
    mirror.start()
    limits = open(f"/proc/{mirror.pid}/limits").read()
    [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)]
    if soft < hard:
        assert f"open files limit raised from {soft} to {hard}" in mirror.log_text()


# --- smaller defects --------------------------------------------------------------


class _Portal(BaseHTTPRequestHandler):
    """An upstream that is not a registry: a captive portal or a login page."""

    content_type = "text/html; charset=utf-8"
    body = b"<html><body>Please sign in</body></html>"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def portal() -> Iterator[type[_Portal]]:
    handler = type("Portal", (_Portal,), {})
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    handler.url = f"http://{LOOPBACK}:{server.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html; charset=utf-8", b"<html><body>Please sign in</body></html>"),
        (DOCKER_MANIFEST, b"<html><body>Please sign in</body></html>"),
        ("application/json", b'{"login": "required"}'),
        (DOCKER_MANIFEST, b'["schemaVersion", 2]'),
    ],
)
def test_a_page_that_is_not_a_manifest_is_never_cached_or_served(
    portal, dockmirror, content_type, body
):
    portal.content_type, portal.body = content_type, body
    mirror = dockmirror({"hub": {"plugin": "registry", "url": portal.url, "default": True}})
    for reference in ("latest", sha256(body)):
        status, headers, answer = curl(f"{mirror.url}/v2/library/app/manifests/{reference}")
        assert status == 502 and error_code(answer) == "UNAVAILABLE", (reference, answer)
    assert cached_blobs(mirror) == {}
    if content_type.startswith("text/html"):
        status, _, _ = curl(f"{mirror.url}/v2/library/app/manifests/latest", method="HEAD")
        assert status == 502


def test_tag_pages_stay_on_the_upstream_ns_chose(
    plain_registry, registry_factory, dockmirror, seeded, unique_repo
):
    other = registry_factory()
    for tag in ("a", "b", "c"):
        seeded(other, unique_repo, tag)
    mirror = dockmirror(
        {
            "hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True},
            "ghcr": {"plugin": "ghcr", "url": other.url},
        }
    )
    status, headers, body = curl(f"{mirror.url}/v2/{unique_repo}/tags/list?ns=ghcr.io&n=2")
    assert (status, json.loads(body)["tags"]) == (200, ["a", "b"])
    link = headers["link"]
    assert link == f'</v2/{unique_repo}/tags/list?n=2&last=b&ns=ghcr.io>; rel="next"'
    status, headers, body = curl(mirror.url + link[1 : link.index(">")])
    assert (status, json.loads(body)["tags"]) == (200, ["c"])


def test_an_invalid_range_is_ignored(plain_registry, dockmirror, seeded, unique_repo):
    layer = seeded(plain_registry, unique_repo, "v1").platforms[0].layers[0]
    mirror = dockmirror({"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}})
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    curl(url)
    for invalid in ("bytes=5-3", "bytes=-5-3", "bytes=+1-2", "bytes=1-+2", "bytes=x-"):
        status, headers, body = curl("-H", f"Range: {invalid}", url)
        assert (status, sha256(body)) == (200, layer.digest), invalid
        assert "content-range" not in headers
    status, headers, _ = curl("-H", f"Range: bytes={layer.size}-", url)
    assert status == 416 and headers["content-range"] == f"bytes */{layer.size}"


def test_a_range_of_a_blob_being_filled_waits_for_verification(
    plain_registry, dockmirror, seeded, unique_repo
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[8 << 20, 200_000])
    bad, good = image.platforms[0].layers
    stored = plain_registry.storage_path_of_blob(bad.digest)
    data = bytearray(stored.read_bytes())
    data[50] ^= 0xFF
    stored.write_bytes(bytes(data))
    mirror = dockmirror({"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}})
    # The range is inside a blob whose fill will fail its digest check: the
    # client never gets a complete 206 of those bytes.
    result = subprocess.run(
        [
            "curl",
            "-s",
            "--noproxy",
            "*",
            "--max-time",
            "30",
            "-r",
            "0-99",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"{mirror.url}/v2/{unique_repo}/blobs/{bad.digest}",
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode != 0, result.stdout
    assert bad.digest not in cached_blobs(mirror)
    # A range of a good blob being filled is served once the blob is verified.
    status, headers, body = curl(
        "-r", "10-19", f"{mirror.url}/v2/{unique_repo}/blobs/{good.digest}"
    )
    assert (status, headers["x-cache"], headers["content-range"]) == (
        206,
        "MISS",
        f"bytes 10-19/{good.size}",
    )
    assert body == plain_registry.storage_path_of_blob(good.digest).read_bytes()[10:20]


# --- file modes -------------------------------------------------------------------


def test_cache_files_are_0640_and_directories_0750(plain_registry, dockmirror, seeded, unique_repo):
    image = seeded(plain_registry, unique_repo, "v1")
    mirror = dockmirror({"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}})
    assert curl(f"{mirror.url}/v2/{unique_repo}/manifests/v1")[0] == 200
    for blob in image.blobs:
        assert curl(f"{mirror.url}/v2/{unique_repo}/blobs/{blob.digest}")[0] == 200
    mirror.stop()  # the index is written out
    root = mirror.cache_dir
    paths = [root, *root.rglob("*")]
    assert len([p for p in paths if p.is_file()]) >= 4
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))


def test_a_portal_answering_everything_proves_no_blob(
    portal, registry_factory, dockmirror, seeded, unique_repo
):
    private = registry_factory()
    secret = seeded(private, unique_repo, "v1").platforms[0].layers[0]
    mirror = dockmirror(
        {
            "portal": {"plugin": "registry", "url": portal.url, "default": True},
            "private": {"plugin": "registry", "url": private.url, "aliases": ["private.test"]},
        }
    )
    status, _, _ = curl(f"{mirror.url}/v2/private.test/{unique_repo}/blobs/{secret.digest}")
    assert status == 200
    wait_until(lambda: secret.digest in cached_blobs(mirror))
    status, _, body = curl(f"{mirror.url}/v2/{unique_repo}/blobs/{secret.digest}")
    assert status == 502 and error_code(body) == "UNAVAILABLE"
