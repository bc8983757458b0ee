"""The integration fixtures themselves work against real registries and skopeo."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from .conftest import (
    DockmirrorFactory,
    RegistryFactory,
    RelayFactory,
    Seeder,
    dockmirror_config,
    toml_document,
)
from .images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Image,
    Platform,
    SkopeoError,
    inspect_raw,
    make_image,
    pull,
    push,
    sha256_digest,
)
from .registries import Registry, RegistryMode, http_status
from .relay import Fault

MULTI_PLATFORM: list[Platform] = [("linux", "amd64"), ("linux", "arm64", "v8")]


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def _get(url: str, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request) as response:
        return bytes(response.read())


@pytest.mark.parametrize("docker_media_types", [False, True], ids=["oci", "docker"])
@pytest.mark.parametrize("platforms", [None, MULTI_PLATFORM], ids=["single", "multi"])
def test_make_image_writes_valid_layout(
    tmp_path: Path, docker_media_types: bool, platforms: list[Platform] | None
) -> None:
    image = make_image(
        tmp_path,
        "v1",
        [3000, 0],
        platforms,
        docker_media_types=docker_media_types,
    )
    manifest_type, index_type, config_type, layer_type = (
        (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_CONFIG, DOCKER_LAYER)
        if docker_media_types
        else (OCI_MANIFEST, OCI_INDEX, "application/vnd.oci.image.config.v1+json", OCI_LAYER)
    )

    index = json.loads((tmp_path / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"] == {REF_NAME_ANNOTATION: "v1"}
    assert (entry["digest"], entry["size"]) == (image.digest, len(image.manifest))
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert _blob(tmp_path, image.digest) == image.manifest
    assert image.is_index == (platforms is not None)
    assert image.media_type == (index_type if platforms else manifest_type)

    top = json.loads(image.manifest)
    if platforms:
        assert [m["platform"] for m in top["manifests"]] == [
            {"architecture": "amd64", "os": "linux"},
            {"architecture": "arm64", "os": "linux", "variant": "v8"},
        ]
        assert [m["digest"] for m in top["manifests"]] == [p.digest for p in image.platforms]
    for platform in image.platforms:
        manifest = json.loads(_blob(tmp_path, platform.digest))
        assert manifest["mediaType"] == manifest_type
        assert manifest["config"]["mediaType"] == config_type
        config = json.loads(_blob(tmp_path, platform.config.digest))
        assert (config["os"], config["architecture"]) == (platform.os, platform.architecture)
        diff_ids = []
        layers = zip(platform.layers, manifest["layers"], [3000, 0], strict=True)
        for layer, descriptor, size in layers:
            assert descriptor == {
                "mediaType": layer_type,
                "digest": layer.digest,
                "size": layer.size,
            }
            compressed = _blob(tmp_path, layer.digest)
            assert sha256_digest(compressed) == layer.digest
            tar_bytes = gzip.decompress(compressed)
            diff_ids.append(sha256_digest(tar_bytes))
            with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
                assert [member.size for member in tar.getmembers()] == [size]
        assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
        assert diff_ids == [layer.diff_id for layer in platform.layers]

    again = make_image(tmp_path, "v1", [10], docker_media_types=docker_media_types)
    assert again.digest != image.digest, "layer content must be random"
    (entry,) = json.loads((tmp_path / "index.json").read_text())["manifests"]
    assert entry["digest"] == again.digest, "re-tagging replaces the index entry"


def _assert_round_trip(registry: Registry, repo: str, image: Image, tmp_path: Path) -> None:
    """The registry serves exactly the generated manifests and blobs."""
    reference = f"{registry.host}/{repo}"
    assert inspect_raw(f"{reference}:{image.tag}", registry.creds) == image.manifest
    assert inspect_raw(f"{reference}@{image.digest}", registry.creds) == image.manifest
    for platform in image.platforms:
        assert inspect_raw(f"{reference}@{platform.digest}", registry.creds) == platform.manifest

    pulled = tmp_path / "pulled"
    pull(f"{reference}:{image.tag}", pulled, registry.creds)
    assert (pulled / "manifest.json").read_bytes() == image.manifest
    for blob in image.blobs:
        content = (pulled / blob.digest.removeprefix("sha256:")).read_bytes()
        assert sha256_digest(content) == blob.digest
    if image.is_index:
        for platform in image.platforms:
            instance = pulled / f"{platform.digest.removeprefix('sha256:')}.manifest.json"
            assert instance.read_bytes() == platform.manifest


@pytest.mark.parametrize("docker_media_types", [False, True], ids=["oci", "docker"])
@pytest.mark.parametrize("platforms", [None, MULTI_PLATFORM], ids=["single", "multi"])
@pytest.mark.parametrize("mode", ["plain", "htpasswd", "token"])
def test_push_preserves_digests(
    request: pytest.FixtureRequest,
    seeded: Seeder,
    unique_repo: str,
    tmp_path: Path,
    mode: RegistryMode,
    platforms: list[Platform] | None,
    docker_media_types: bool,
) -> None:
    registry: Registry = request.getfixturevalue(f"{mode}_registry")
    image = seeded(
        registry,
        unique_repo,
        "v1",
        layers=[2048, 70_000],
        platforms=platforms,
        docker_media_types=docker_media_types,
    )
    _assert_round_trip(registry, unique_repo, image, tmp_path)


def test_push_to_explicit_layout_and_read_back(
    plain_registry: Registry, unique_repo: str, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    first = make_image(layout, "one", [100])
    second = make_image(layout, "two", [100], MULTI_PLATFORM)
    push(layout, "one", plain_registry.host, unique_repo)
    push(layout, "two", plain_registry.host, unique_repo)
    assert inspect_raw(f"{plain_registry.host}/{unique_repo}:one") == first.manifest
    assert inspect_raw(f"{plain_registry.host}/{unique_repo}:two") == second.manifest


def test_htpasswd_registry_requires_credentials(
    htpasswd_registry: Registry, seeded: Seeder, unique_repo: str
) -> None:
    image = seeded(htpasswd_registry, unique_repo)
    reference = f"{htpasswd_registry.host}/{unique_repo}:latest"
    with pytest.raises(SkopeoError, match="authentication required|unauthorized"):
        inspect_raw(reference)
    with pytest.raises(SkopeoError):
        inspect_raw(reference, ("reguser", "wrong"))
    assert inspect_raw(reference, htpasswd_registry.creds) == image.manifest


def test_token_registry_rejects_anonymous_push(
    token_registry: Registry, unique_repo: str, tmp_path: Path
) -> None:
    token_server = token_registry.token_server
    assert token_server is not None
    make_image(tmp_path, "v1", [100])
    token_server.clear_requests()

    with pytest.raises(SkopeoError, match="denied|unauthorized"):
        push(tmp_path, "v1", token_registry.host, unique_repo)
    assert token_server.requests, "skopeo must have asked for a token"
    assert not any(r.authorization for r in token_server.requests)
    assert token_registry.count_requests("POST", f"/v2/{unique_repo}/blobs/uploads/", 401) >= 1

    token_server.clear_requests()
    push(tmp_path, "v1", token_registry.host, unique_repo, token_registry.creds)
    authorized = [r for r in token_server.requests if r.authorization]
    assert authorized and all(r.username == token_server.credentials[0] for r in authorized)
    assert f"repository:{unique_repo}:pull,push" in authorized[0].scopes
    assert all(r.status == 200 and r.client == "127.0.0.1" for r in token_server.requests)


def test_token_server_without_anonymous_pull(
    registry_factory: RegistryFactory, seeded: Seeder, tmp_path: Path
) -> None:
    registry = registry_factory("token", anonymous_pull=False, credentials=("alice", "pw"))
    token_server = registry.token_server
    assert token_server is not None and registry.creds == ("alice", "pw")
    image = seeded(registry, "private/app")
    reference = f"{registry.host}/private/app:latest"

    token_server.clear_requests()
    with pytest.raises(SkopeoError, match="denied|unauthorized"):
        inspect_raw(reference)
    with pytest.raises(SkopeoError, match="incorrect username or password"):
        inspect_raw(reference, ("alice", "wrong"))
    assert [(r.authorization, r.status) for r in token_server.requests][-1] == (True, 401)
    assert inspect_raw(reference, registry.creds) == image.manifest

    token_server.anonymous_pull = True
    assert inspect_raw(reference) == image.manifest


def test_token_server_stop_and_start(registry_factory: RegistryFactory, seeded: Seeder) -> None:
    registry = registry_factory("token")
    token_server = registry.token_server
    assert token_server is not None
    image = seeded(registry, "lib/app")
    realm = token_server.realm

    token_server.stop()
    with pytest.raises(SkopeoError, match="connection refused"):
        inspect_raw(f"{registry.host}/lib/app:latest")
    token_server.start()
    assert token_server.realm == realm
    assert inspect_raw(f"{registry.host}/lib/app:latest") == image.manifest


def test_token_contents(token_registry: Registry) -> None:
    token_server = token_registry.token_server
    assert token_server is not None
    query = (
        "service=registry.docker.io&scope=repository:a/b:pull,push"
        "&scope=repository:c:pull&account=x"
    )
    body = json.loads(_get(f"{token_server.realm}?{query}"))
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == token_server.token_lifetime and body["issued_at"]

    certificate = x509.load_pem_x509_certificate(token_server.cert_path.read_bytes())
    public_key = certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == "RS256" and len(header["x5c"]) == 1
    claims = jwt.decode(
        body["token"], public_key, algorithms=["RS256"], audience="registry.docker.io"
    )
    assert claims["iss"] == token_server.issuer and claims["sub"] == ""
    assert claims["access"] == [
        {"type": "repository", "name": "a/b", "actions": ["pull"]},
        {"type": "repository", "name": "c", "actions": ["pull"]},
    ]
    recorded = token_server.requests[-1]
    assert recorded.query["account"] == ["x"] and not recorded.authorization


def test_count_requests(plain_registry: Registry, seeded: Seeder, unique_repo: str) -> None:
    image = seeded(plain_registry, unique_repo, layers=[5000])
    layer = image.platforms[0].layers[0]
    blob_path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    assert plain_registry.count_requests("GET", blob_path) == 0
    heads = plain_registry.count_requests("HEAD", blob_path)
    assert heads >= 1, "skopeo checks for the blob before uploading it"

    for _ in range(2):
        assert sha256_digest(_get(plain_registry.url + blob_path)) == layer.digest
    assert plain_registry.count_requests("GET", blob_path) == 2
    assert plain_registry.count_requests("GET", blob_path, status=200) == 2
    assert plain_registry.count_requests("HEAD", blob_path) == heads
    assert plain_registry.count_requests("PUT", f"/v2/{unique_repo}/manifests/latest", 201) == 1

    with pytest.raises(urllib.error.HTTPError):
        _get(f"{plain_registry.url}/v2/{unique_repo}/manifests/missing")
    assert plain_registry.count_requests("GET", f"/v2/{unique_repo}/manifests/missing", 404) == 1
    assert not any("log-barrier" in entry.uri for entry in plain_registry.requests())


def test_oci_manifest_needs_accept_header(
    plain_registry: Registry, seeded: Seeder, unique_repo: str
) -> None:
    """distribution 2.8 answers 404 for an OCI manifest unless the client accepts OCI."""
    image = seeded(plain_registry, unique_repo)
    url = f"{plain_registry.url}/v2/{unique_repo}/manifests/latest"
    with pytest.raises(urllib.error.HTTPError) as error:
        _get(url)
    assert error.value.code == 404
    assert _get(url, {"Accept": OCI_MANIFEST}) == image.manifest


def test_blob_storage_path(plain_registry: Registry, seeded: Seeder, unique_repo: str) -> None:
    image = seeded(plain_registry, unique_repo)
    for blob in image.blobs:
        stored = plain_registry.storage_path_of_blob(blob.digest).read_bytes()
        assert sha256_digest(stored) == blob.digest

    layer = image.platforms[0].layers[0]
    path = plain_registry.storage_path_of_blob(layer.digest)
    corrupted = bytes(b ^ 0xFF for b in path.read_bytes())
    path.write_bytes(corrupted)
    assert _get(f"{plain_registry.url}/v2/{unique_repo}/blobs/{layer.digest}") == corrupted


def test_stop_and_start(registry_factory: RegistryFactory, seeded: Seeder, tmp_path: Path) -> None:
    registry = registry_factory("htpasswd")
    image = seeded(registry, "lib/app")
    port = registry.port
    registry.stop()
    assert not registry.running
    with pytest.raises(OSError):
        http_status(f"{registry.url}/v2/")
    assert registry.count_requests("PUT", "/v2/lib/app/manifests/latest") == 1

    registry.start()
    assert registry.port == port and registry.running
    assert inspect_raw(f"{registry.host}/lib/app:latest", registry.creds) == image.manifest
    assert registry.count_requests("PUT", "/v2/lib/app/manifests/latest") == 1


def test_dockmirror_config_matches_contract(tmp_path: Path) -> None:
    upstreams: dict[str, dict[str, Any]] = {
        "hub": {"plugin": "dockerhub", "url": "http://127.0.0.1:1", "default": True},
        "private": {
            "plugin": "registry",
            "url": "http://127.0.0.1:2",
            "aliases": ["private.example"],
            "hosts": ["private.mirror.test"],
            "username": "u",
            "password": 'p"\\w',
        },
    }
    config = dockmirror_config(
        tmp_path, 5555, upstreams, auth_required=True, extra={"cache": {"max_size": 10}}
    )
    assert tomllib.loads(toml_document(config)) == {
        "server": {
            "listen": ["tcp:5555:interface=127.0.0.1"],
            "public_url": "http://127.0.0.1:5555",
        },
        "auth": {"required": True, "database": str(tmp_path / "keys.sqlite")},
        "cache": {"directory": str(tmp_path / "cache"), "max_size": 10},
        "upstreams": upstreams,
    }


def test_dockmirror_process(dockmirror: DockmirrorFactory, plain_registry: Registry) -> None:
    hub = {"plugin": "dockerhub", "url": plain_registry.url, "default": True}
    mirror = dockmirror({"hub": hub})
    assert http_status(f"{mirror.url}/v2/") == 200
    mirror.restart()
    assert http_status(f"{mirror.url}/v2/") == 200
    mirror.kill9()
    assert not mirror.running
    mirror.restart()
    assert mirror.running and mirror.log_text()


def test_dockmirror_start_failure_reports_log(dockmirror: DockmirrorFactory) -> None:
    upstream = {"plugin": "no-such-plugin", "url": "http://127.0.0.1:1", "default": True}
    with pytest.raises(RuntimeError, match="exited before answering") as error:
        dockmirror({"hub": upstream})
    assert "no-such-plugin" in str(error.value)


def test_relay_forwards_and_injects_faults(
    plain_registry: Registry, relay: RelayFactory, seeded: Seeder, unique_repo: str
) -> None:
    image = seeded(plain_registry, unique_repo, layers=[200_000])
    layer = image.platforms[0].layers[0]
    upstream = relay(plain_registry)
    url = f"{upstream.url}/v2/{unique_repo}/blobs/{layer.digest}"

    def fetch() -> bytes:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=30) as response:
            return bytes(response.read())

    assert hashlib.sha256(fetch()).hexdigest() == layer.digest[7:]
    upstream.faults.append(Fault(r"/blobs/", flip=1000))
    flipped = fetch()
    assert len(flipped) == layer.size
    assert hashlib.sha256(flipped).hexdigest() != layer.digest[7:]
    upstream.faults[:] = [Fault(r"/blobs/", cut_after=5000)]
    with pytest.raises(http.client.IncompleteRead):
        fetch()
    # Held: nothing arrives before release, then all of it.
    upstream.faults[:] = [Fault(r"/blobs/", hold=True, rate=400_000)]
    upstream.hold()
    with ThreadPoolExecutor(3) as pool:
        results = [pool.submit(fetch) for _ in range(3)]
        upstream.wait_for(lambda r: r.held == 3)
        assert not any(result.done() for result in results)
        started = time.monotonic()
        upstream.release()
        bodies = [result.result(timeout=30) for result in results]
    assert time.monotonic() - started >= 0.4  # 200 kB at 400 kB/s
    assert {hashlib.sha256(body).hexdigest() for body in bodies} == {layer.digest[7:]}
    assert upstream.count(rf"^GET /v2/{unique_repo}/blobs/{layer.digest} HTTP/1.1$") == 6
