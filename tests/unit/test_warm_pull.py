"""Refreshing a tag for a warm round, against a scripted upstream."""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred

from ._cache_support import sha256
from .test_cache_pull import (  # noqa: F401 - the fixture
    DOCKER_MANIFEST,
    MANIFEST,
    Answer,
    get,
    manifest,
    manifest_answer,
    setup,
)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": sha256(MANIFEST), "size": 1}],
    }
).encode()


def refresh(pull, route):
    return get(Deferred.fromCoroutine(pull.manifests.refresh_tag(route, "v1")))


def head_answer(body: bytes, media_type: str) -> Answer:
    return Answer(200, b"", {"Content-Type": media_type, "Docker-Content-Digest": sha256(body)})


def test_a_fresh_tag_is_asked_with_a_head_only(setup):  # noqa: F811
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    upstream.answers[("HEAD", "manifests/v1")] = head_answer(MANIFEST, DOCKER_MANIFEST)
    assert manifest(pull, route).headers["X-Cache"] == "MISS"
    reply = refresh(pull, route)
    assert (reply.headers["X-Cache"], reply.body) == ("REVALIDATED", MANIFEST)
    assert upstream.requests == [("GET", "manifests/v1"), ("HEAD", "manifests/v1")]


def test_a_moved_tag_is_fetched_and_its_other_entries_expire(setup):  # noqa: F811
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)  # the entry an index-less client gets
    upstream.answers[("GET", "manifests/v1")] = Answer(
        200, INDEX, {"Content-Type": OCI_INDEX, "Docker-Content-Digest": sha256(INDEX)}
    )
    upstream.answers[("HEAD", "manifests/v1")] = head_answer(INDEX, OCI_INDEX)
    reply = refresh(pull, route)
    assert (reply.headers["X-Cache"], reply.body) == ("MISS", INDEX)
    # The index-less client's entry is asked about again, not served as it was.
    upstream.answers[("HEAD", "manifests/v1")] = head_answer(MANIFEST, DOCKER_MANIFEST)
    assert manifest(pull, route).headers["X-Cache"] == "REVALIDATED"
    assert upstream.requests.count(("HEAD", "manifests/v1")) == 2


def test_a_tag_naming_a_cached_manifest_is_not_fetched(setup):  # noqa: F811
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    manifest(pull, route)
    cache.manifests.forget_tag(f"{route.key} {route.base_url}", "v1")
    upstream.answers[("HEAD", "manifests/v1")] = head_answer(MANIFEST, DOCKER_MANIFEST)
    assert refresh(pull, route).headers["X-Cache"] == "REVALIDATED"
    assert upstream.requests.count(("GET", "manifests/v1")) == 1


def test_a_tag_moved_a_moment_after_it_was_fetched_is_fetched_again(setup):  # noqa: F811
    """Two rounds within a second: the second takes nothing the first heard."""
    clock, upstream, cache, pull, route = setup
    upstream.answers[("GET", "manifests/v1")] = manifest_answer()
    upstream.answers[("HEAD", "manifests/v1")] = head_answer(MANIFEST, DOCKER_MANIFEST)
    assert refresh(pull, route).body == MANIFEST
    upstream.answers[("GET", "manifests/v1")] = Answer(
        200, INDEX, {"Content-Type": OCI_INDEX, "Docker-Content-Digest": sha256(INDEX)}
    )
    upstream.answers[("HEAD", "manifests/v1")] = head_answer(INDEX, OCI_INDEX)
    reply = refresh(pull, route)
    assert (reply.headers["Docker-Content-Digest"], reply.body) == (sha256(INDEX), INDEX)
    assert upstream.requests.count(("GET", "manifests/v1")) == 2
