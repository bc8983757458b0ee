"""Signatures and SBOMs through the mirror: the OCI 1.1 referrers API and the tag schema."""

from __future__ import annotations

import json

import pytest

from .images import (
    COSIGN_ARTIFACT,
    OCI_INDEX,
    inspect_raw,
    make_signature,
    pull,
    push,
    signature_tag,
)
from .test_cache import sha256
from .test_pull import assert_pulled, curl, error_code
from .upstream_servers import Relay, referrers_api


@pytest.fixture
def signed(plain_registry, seeded, unique_repo, tmp_path_factory):
    """An image and its cosign signature, pushed under the tag ``sha256-<hex>.sig``."""
    image = seeded(plain_registry, unique_repo, "v1")
    layout = tmp_path_factory.mktemp("signature")
    tag = signature_tag(image.digest)
    signature = make_signature(layout, image, tag)
    push(layout, tag, plain_registry.host, unique_repo)
    return image, signature


def test_without_a_referrers_api_upstream_the_mirror_answers_404(
    plain_registry, dockmirror, signed, unique_repo
):
    image, _ = signed
    mirror = dockmirror({"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}})
    url = f"{mirror.url}/v2/{unique_repo}/referrers/{image.digest}"
    for query in ("", f"?artifactType={COSIGN_ARTIFACT}"):
        status, headers, body = curl(url + query)
        assert status == 404 and headers["content-type"] == "application/json"
        assert error_code(body) in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN")
        assert "tag schema" in json.loads(body)["errors"][0]["message"]
    assert plain_registry.count_requests("GET", f"/referrers/{image.digest}") == 2


@pytest.mark.parametrize(
    "query", ["?artifactType=nonsense", "?artifactType=a/b%0d%0aX:%20y", "?artifactType=%ff/x"]
)
def test_an_artifact_type_that_is_no_media_type_is_refused(
    plain_registry, dockmirror, unique_repo, query
):
    mirror = dockmirror({"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}})
    digest = "sha256:" + "0" * 64
    status, _, body = curl(f"{mirror.url}/v2/{unique_repo}/referrers/{digest}{query}")
    assert (status, error_code(body)) == (400, "UNSUPPORTED")
    assert plain_registry.count_requests("GET", f"{unique_repo}/referrers/") == 0


def test_cosign_tag_schema_signatures_pass_as_tags(
    plain_registry, dockmirror, signed, unique_repo, tmp_path
):
    image, signature = signed
    mirror = dockmirror({"hub": {"plugin": "registry", "url": plain_registry.url, "default": True}})
    reference = f"{mirror.host}/{unique_repo}:{signature_tag(image.digest)}"
    assert inspect_raw(reference) == signature.manifest
    pull(reference, tmp_path / "signature")
    assert_pulled(tmp_path / "signature", signature)
    layer = signature.platforms[0].layers[0]
    status, headers, body = curl(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
    assert (status, headers["x-cache"], sha256(body)) == (200, "HIT", layer.digest)
    assert json.loads(body)["critical"]["image"]["docker-manifest-digest"] == image.digest


def test_referrers_from_an_upstream_with_the_api_are_cached_and_kept_apart(
    plain_registry, registry_factory, dockmirror, signed, unique_repo
):
    image, signature = signed
    other = registry_factory()
    with Relay(plain_registry.url, {unique_repo: referrers_api(plain_registry.url)}) as relay:
        mirror = dockmirror(
            {
                "hub": {"plugin": "registry", "url": relay.url, "default": True},
                "other": {"plugin": "registry", "url": other.url, "aliases": ["other.test"]},
            },
            extra={"cache": {"manifest_ttl": 600}},
        )
        url = f"{mirror.url}/v2/{unique_repo}/referrers/{image.digest}"
        for expected in ("MISS", "HIT"):
            status, headers, body = curl(url)
            assert (status, headers["x-cache"]) == (200, expected)
            assert headers["content-type"] == OCI_INDEX
            index = json.loads(body)
            assert [m["digest"] for m in index["manifests"]] == [signature.digest]
            assert index["manifests"][0]["artifactType"] == COSIGN_ARTIFACT
        assert relay.count(f"/referrers/{image.digest}") == 1
        status, headers, body = curl(f"{url}?artifactType=application/spdx%2Bjson")
        assert (status, json.loads(body)["manifests"]) == (200, [])
        assert headers["oci-filters-applied"] == "artifactType"
        # The referrer is then pulled by digest, proven as any manifest and blob.
        status, _, body = curl(
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            f"{mirror.url}/v2/{unique_repo}/manifests/{signature.digest}",
        )
        assert (status, body) == (200, signature.manifest)
        layer = signature.platforms[0].layers[0]
        status, _, body = curl(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
        assert (status, sha256(body)) == (200, layer.digest)
        # Nothing of it is served through another upstream that does not hold it.
        other_url = f"{mirror.url}/v2/other.test/{unique_repo}"
        status, _, _ = curl(f"{other_url}/referrers/{image.digest}")
        assert status == 404
        status, _, _ = curl(f"{other_url}/manifests/{signature.digest}")
        assert status == 404
        status, _, _ = curl(f"{other_url}/blobs/{layer.digest}")
        assert status == 404
