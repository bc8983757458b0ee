"""The pull path end to end: skopeo and curl through dockmirror to real registries."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .images import SkopeoError, pull
from .registries import free_port
from .tls import server_tls

MULTI_ARCH = [("linux", "amd64"), ("linux", "arm64")]


def curl(*args: str, method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """Run curl; return status, headers (lower-cased names) and body.

    HTTPS servers are verified against the test CA (:mod:`.tls`).
    """
    argv = ["curl", "-s", "-S", "--max-time", "30", "-D", "-", "--noproxy", "*"]
    argv += ["--cacert", str(server_tls().ca)]
    if method == "HEAD":
        argv.append("-I")
    elif method:
        argv += ["-X", method]
    out = subprocess.run([*argv, *args], capture_output=True, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def error_code(body: bytes) -> str:
    data = json.loads(body)
    [entry] = data["errors"]
    assert set(entry) == {"code", "message", "detail"}
    return str(entry["code"])


def assert_pulled(dest: Path, image: Any) -> None:
    """skopeo's dir: copy holds the upstream's exact manifest and blobs."""
    assert (dest / "manifest.json").read_bytes() == image.manifest
    for platform in image.platforms:
        if image.is_index:
            manifest = dest / f"{platform.digest.split(':')[1]}.manifest.json"
            assert manifest.read_bytes() == platform.manifest
        for blob in (platform.config, *platform.layers):
            data = (dest / blob.digest.split(":")[1]).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


@pytest.fixture
def hub(plain_registry, other_registry, dockmirror):
    """A TLS mirror: Docker Hub (the default) is ``plain_registry``, ghcr ``other_registry``."""
    return dockmirror(
        {
            "hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True},
            "ghcr": {
                "plugin": "ghcr",
                "url": other_registry.url,
                "hosts": ["ghcr.mirror.test"],
            },
        },
        tls=True,
    )


def test_pulls_verify_the_mirror_certificate(plain_registry, hub, seeded, unique_repo, tmp_path):
    """The TLS pulls here are verified: without the test CA, skopeo refuses the mirror."""
    seeded(plain_registry, unique_repo, "v1")
    with pytest.raises(SkopeoError, match="certificate signed by unknown authority"):
        pull(f"{hub.host}/{unique_repo}:v1", tmp_path / "out", cert_dir=tmp_path)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_multi_arch_image_by_default_route(plain_registry, hub, seeded, unique_repo, tmp_path):
    image = seeded(plain_registry, unique_repo, "v1", layers=[2048, 300_000], platforms=MULTI_ARCH)
    pull(f"{hub.host}/{unique_repo}:v1", tmp_path / "out", cert_dir=hub.cert_dir)
    assert_pulled(tmp_path / "out", image)
    assert image.is_index


def test_one_component_name_gets_library(plain_registry, hub, seeded, unique_repo, tmp_path):
    short = unique_repo.replace("/", "-")
    image = seeded(plain_registry, f"library/{short}", "3", docker_media_types=True)
    pull(f"{hub.host}/{short}:3", tmp_path / "a", cert_dir=hub.cert_dir)
    assert_pulled(tmp_path / "a", image)
    pull(f"{hub.host}/docker.io/library/{short}:3", tmp_path / "b", cert_dir=hub.cert_dir)
    assert_pulled(tmp_path / "b", image)


def test_path_prefix_route(other_registry, hub, seeded, unique_repo, tmp_path):
    image = seeded(other_registry, unique_repo, "tag", platforms=MULTI_ARCH)
    pull(f"{hub.host}/ghcr.io/{unique_repo}:tag", tmp_path / "out", cert_dir=hub.cert_dir)
    assert_pulled(tmp_path / "out", image)


def test_host_and_ns_routes(plain_registry, other_registry, hub, seeded, unique_repo):
    """The same name on two registries: Host, ?ns= and the prefix each pick the right one."""
    hub_image = seeded(plain_registry, unique_repo, "tag")
    ghcr_image = seeded(other_registry, unique_repo, "tag")
    assert hub_image.digest != ghcr_image.digest
    manifest_path = f"/v2/{unique_repo}/manifests/tag"
    routes = [
        ([], manifest_path, hub_image),
        (["-H", "Host: ghcr.mirror.test"], manifest_path, ghcr_image),
        (["-H", "Host: GHCR.mirror.test:443"], manifest_path, ghcr_image),
        ([], manifest_path + "?ns=ghcr.io", ghcr_image),
        ([], manifest_path + "?ns=docker.io", hub_image),
        ([], f"/v2/ghcr.io/{unique_repo}/manifests/tag", ghcr_image),
        (["-H", "Host: other.mirror.test"], manifest_path, hub_image),
    ]
    for headers, path, image in routes:
        accept = ("-H", f"Accept: {image.media_type}")
        status, got, body = curl(*headers, *accept, hub.url + path)
        assert (status, body) == (200, image.manifest), (headers, path)
        assert got["docker-content-digest"] == image.digest
        assert got["content-type"] == image.media_type
    layer = ghcr_image.platforms[0].layers[0]
    blob_path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    status, _, body = curl("-H", "Host: ghcr.mirror.test", hub.url + blob_path)
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
    # Docker Hub's registry does not have that layer: the default route does not serve it.
    status, _, body = curl(hub.url + blob_path)
    assert status == 404 and error_code(body) == "BLOB_UNKNOWN"
    # containerd's ?ns= names the registry; one that is not mirrored is refused.
    status, _, body = curl(f"{hub.url}{manifest_path}?ns=unknown.example")
    assert status == 404 and error_code(body) == "NAME_UNKNOWN"


def test_private_upstream_with_credentials(
    htpasswd_registry, dockmirror, seeded, unique_repo, tmp_path
):
    image = seeded(htpasswd_registry, unique_repo, "v1", platforms=MULTI_ARCH)
    user, password = htpasswd_registry.creds
    mirror = dockmirror(
        {
            "corp": {
                "plugin": "registry",
                "url": htpasswd_registry.url,
                "aliases": ["corp.example"],
                "username": user,
                "password": password,
            }
        },
        tls=True,
    )
    pull(f"{mirror.host}/corp.example/{unique_repo}:v1", tmp_path / "out", cert_dir=mirror.cert_dir)
    assert_pulled(tmp_path / "out", image)


def test_private_upstream_with_wrong_credentials_is_denied(
    htpasswd_registry, dockmirror, seeded, unique_repo
):
    seeded(htpasswd_registry, unique_repo, "v1")
    mirror = dockmirror(
        {
            "corp": {
                "plugin": "registry",
                "url": htpasswd_registry.url,
                "default": True,
                "username": "nobody",
                "password": "wrong",
            }
        }
    )
    status, _, body = curl(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
    assert status == 403 and error_code(body) == "DENIED"


def test_token_auth_upstream(token_registry, dockmirror, seeded, unique_repo, tmp_path):
    image = seeded(token_registry, unique_repo, "v1", layers=[1000, 2000], platforms=MULTI_ARCH)
    token_registry.token_server.clear_requests()
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": token_registry.url, "default": True}}, tls=True
    )
    pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "out", cert_dir=mirror.cert_dir)
    assert_pulled(tmp_path / "out", image)
    requests = token_registry.token_server.requests
    # One token per repository scope, cached across the image's many requests.
    assert len(requests) == 1
    assert requests[0].scopes == [f"repository:{unique_repo}:pull"]


def test_token_auth_upstream_with_credentials(
    registry_factory, dockmirror, seeded, unique_repo, tmp_path
):
    registry = registry_factory("token", anonymous_pull=False)
    image = seeded(registry, unique_repo, "v1")
    user, password = registry.creds
    mirror = dockmirror(
        {
            "hub": {
                "plugin": "dockerhub",
                "url": registry.url,
                "default": True,
                "username": user,
                "password": password,
                "token_realms": [registry.token_server.origin],
            }
        },
        tls=True,
    )
    pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "out", cert_dir=mirror.cert_dir)
    assert_pulled(tmp_path / "out", image)
    assert registry.token_server.requests
    assert all(r.username == user for r in registry.token_server.requests)


def test_head_stays_head(plain_registry, hub, seeded, unique_repo):
    image = seeded(plain_registry, unique_repo, "v1")
    status, headers, _ = curl(
        "-H",
        f"Accept: {image.media_type}",
        f"{hub.url}/v2/{unique_repo}/manifests/v1",
        method="HEAD",
    )
    assert status == 200
    assert headers["docker-content-digest"] == image.digest
    assert int(headers["content-length"]) == len(image.manifest)
    assert plain_registry.count_requests("HEAD", f"/v2/{unique_repo}/manifests/v1") == 1
    assert plain_registry.count_requests("GET", f"/v2/{unique_repo}/manifests/v1") == 0
    layer = image.platforms[0].layers[0]
    status, headers, _ = curl(f"{hub.url}/v2/{unique_repo}/blobs/{layer.digest}", method="HEAD")
    assert status == 200
    assert int(headers["content-length"]) == layer.size


def test_blob_get_declares_its_length(plain_registry, hub, seeded, unique_repo):
    """A short body must be detectable: the length goes out before the body."""
    image = seeded(plain_registry, unique_repo, "v1")
    layer = image.platforms[0].layers[0]
    status, headers, body = curl(f"{hub.url}/v2/{unique_repo}/blobs/{layer.digest}")
    assert status == 200
    assert int(headers["content-length"]) == layer.size == len(body)
    assert "transfer-encoding" not in headers


def test_range_request(plain_registry, hub, seeded, unique_repo):
    image = seeded(plain_registry, unique_repo, "v1", layers=[100_000])
    layer = image.platforms[0].layers[0]
    url = f"{hub.url}/v2/{unique_repo}/blobs/{layer.digest}"
    _, _, whole = curl(url)
    status, headers, part = curl("-r", "100-1099", url)
    assert status == 206
    assert headers["content-range"] == f"bytes 100-1099/{layer.size}"
    assert part == whole[100:1100]


def test_tags_list_pagination(plain_registry, hub, seeded, unique_repo):
    name = f"ghcr-{unique_repo}"
    for tag in ("c", "a", "b"):
        seeded(plain_registry, name, tag)
    status, headers, body = curl(f"{hub.url}/v2/{name}/tags/list?n=2")
    assert status == 200
    assert json.loads(body) == {"name": name, "tags": ["a", "b"]}
    link = headers["link"]
    assert link == f'</v2/{name}/tags/list?n=2&last=b>; rel="next"'
    # The client follows the link as given.
    status, headers, body = curl(hub.url + link.partition("<")[2].partition(">")[0])
    assert status == 200
    assert json.loads(body) == {"name": name, "tags": ["c"]}
    assert "link" not in headers
    status, headers, body = curl(f"{hub.url}/v2/{name}/tags/list")
    assert (status, json.loads(body)["tags"]) == (200, ["a", "b", "c"])
    assert "link" not in headers


@pytest.mark.parametrize(
    ("path", "method", "status", "code"),
    [
        ("/v2/../../etc/passwd/manifests/latest", "GET", 400, "NAME_INVALID"),
        ("/v2/%2e%2e/manifests/latest", "GET", 400, "NAME_INVALID"),
        ("/v2/UPPER/manifests/latest", "GET", 400, "NAME_INVALID"),
        ("/v2/a/blobs/sha256:1234", "GET", 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:" + "0" * 32, "GET", 400, "DIGEST_INVALID"),
        ("/v2/a/manifests/-x", "GET", 400, "TAG_INVALID"),
        ("/v2/nope/nothing/manifests/latest", "GET", 404, "MANIFEST_UNKNOWN"),
        ("/v2/nope/blobs/sha256:" + "0" * 64, "GET", 404, "BLOB_UNKNOWN"),
        ("/v2/a/manifests/latest", "PUT", 405, "UNSUPPORTED"),
        ("/v2/a/blobs/uploads/", "POST", 405, "UNSUPPORTED"),
        ("/v2/a/manifests/latest", "DELETE", 405, "UNSUPPORTED"),
        ("/v2/a/b/c", "GET", 404, "NAME_UNKNOWN"),
        ("/v2/_catalog", "GET", 405, "UNSUPPORTED"),
        ("/nothing", "GET", 404, "NAME_UNKNOWN"),
    ],
)
def test_bad_requests_get_registry_errors(hub, path, method, status, code):
    got, headers, body = curl("--path-as-is", hub.url + path, method=method)
    assert (got, error_code(body)) == (status, code)
    assert headers["content-type"] == "application/json"
    assert curl(hub.url + "/v2/")[0] == 200


def test_unreachable_upstream_is_a_clean_503(dockmirror):
    dead = f"http://127.0.0.1:{free_port()}"
    mirror = dockmirror({"hub": {"plugin": "dockerhub", "url": dead, "default": True}})
    status, _, body = curl(f"{mirror.url}/v2/library/x/manifests/latest")
    assert status == 503 and error_code(body) == "UNAVAILABLE"
    assert "Traceback" not in mirror.log_text()


def test_api_version_header(hub):
    status, headers, body = curl(f"{hub.url}/v2/")
    assert status == 200
    assert headers["docker-distribution-api-version"] == "registry/2.0"
