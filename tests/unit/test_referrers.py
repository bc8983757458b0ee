"""The referrers API against a scripted upstream: validation, caching, stale answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from dockmirror.cache.referrers import referrers_list
from dockmirror.errors import RegistryError
from dockmirror.pull import PullService
from dockmirror.reference import check_media_type

from .test_cache_pull import (  # noqa: F401 - the fixture
    Answer,
    ScriptedResponse,
    ScriptedUpstream,
    get,
    setup,
)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SUBJECT = "sha256:" + "a" * 64
SIG = {
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": "sha256:" + "b" * 64,
    "size": 500,
    "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
}
SBOM = {**SIG, "digest": "sha256:" + "c" * 64, "artifactType": "application/spdx+json"}
LIST = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [SIG, SBOM]}).encode()
PATH = ("GET", f"referrers/{SUBJECT}")


def referrers(pull, route, artifact_type=None):
    return get(Deferred.fromCoroutine(pull.referrers(route, SUBJECT, artifact_type, False)))


def answer(body: bytes = LIST, content_type: str = OCI_INDEX, **headers: str) -> Answer:
    return Answer(200, body, {"Content-Type": content_type, **headers})


def test_a_list_is_kept_for_the_ttl_then_asked_again(setup):  # noqa: F811
    clock, upstream, cache, pull, route = setup
    upstream.answers[PATH] = answer()
    assert referrers(pull, route).headers["X-Cache"] == "MISS"
    reply = referrers(pull, route)
    assert (reply.headers["X-Cache"], reply.body) == ("HIT", LIST)
    assert reply.headers["Content-Type"] == OCI_INDEX
    assert upstream.requests.count(PATH) == 1
    assert upstream.headers[0] == {"Accept": OCI_INDEX}
    clock.advance(60)
    assert referrers(pull, route).headers["X-Cache"] == "MISS"
    assert upstream.requests.count(PATH) == 2


def test_an_unfiltered_answer_is_filtered_here(setup):  # noqa: F811
    clock, upstream, cache, pull, route = setup
    upstream.answers[PATH] = answer()
    reply = referrers(pull, route, "application/spdx+json")
    assert json.loads(reply.body)["manifests"] == [SBOM]
    assert reply.headers["OCI-Filters-Applied"] == "artifactType"
    # Each filter is its own entry; the unfiltered list is not the filtered one.
    assert json.loads(referrers(pull, route).body)["manifests"] == [SIG, SBOM]


@pytest.mark.parametrize("failure", [None, Answer(503), Answer(429)])
def test_an_expired_list_is_served_stale_when_the_upstream_fails(setup, failure):  # noqa: F811
    clock, upstream, cache, pull, route = setup
    upstream.answers[PATH] = answer()
    referrers(pull, route)
    clock.advance(60)
    upstream.answers[PATH] = failure
    reply = referrers(pull, route)
    assert (reply.headers["X-Cache"], reply.body) == ("STALE", LIST)


def test_a_404_is_the_answer_and_forgets_the_list(setup):  # noqa: F811
    clock, upstream, cache, pull, route = setup
    upstream.answers[PATH] = answer()
    referrers(pull, route)
    clock.advance(60)
    upstream.answers[PATH] = Answer(404, b"404 page not found")
    with pytest.raises(RegistryError) as info:
        referrers(pull, route)
    assert (info.value.status, info.value.code) == (404, "MANIFEST_UNKNOWN")
    assert cache.referrers.get((f"{route.key} {route.base_url}", SUBJECT, "")) is None


@pytest.mark.parametrize(
    "body, content_type",
    [
        (LIST, "application/json"),
        (LIST, "text/html"),
        (b"<html>", OCI_INDEX),
        (b"[]", OCI_INDEX),
        (json.dumps({"schemaVersion": 2, "manifests": {}}).encode(), OCI_INDEX),
        (json.dumps({"schemaVersion": 1, "manifests": []}).encode(), OCI_INDEX),
        (
            json.dumps(
                {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
            ).encode(),
            OCI_INDEX,
        ),
        *(
            (json.dumps({"schemaVersion": 2, "manifests": [bad]}).encode(), OCI_INDEX)
            for bad in (
                {**SIG, "digest": "sha256:../../etc"},
                {**SIG, "size": -1},
                {**SIG, "size": True},
                {**SIG, "mediaType": "no type"},
                {**SIG, "artifactType": "x\r\ny"},
                {**SIG, "annotations": []},
                "sha256:" + "b" * 64,
            )
        ),
    ],
)
def test_what_is_no_referrers_list_is_a_502_and_not_kept(setup, body, content_type):  # noqa: F811
    clock, upstream, cache, pull, route = setup
    assert referrers_list(body, content_type) is None
    upstream.answers[PATH] = answer(body, content_type)
    with pytest.raises(RegistryError) as info:
        referrers(pull, route)
    assert (info.value.status, info.value.code) == (502, "UNAVAILABLE")
    upstream.answers[PATH] = answer()
    assert referrers(pull, route).headers["X-Cache"] == "MISS"


def test_a_list_over_the_manifest_limit_is_refused(setup):  # noqa: F811
    clock, upstream, cache, pull, route = setup
    many = [SIG] * 40_000
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": many}).encode()
    assert len(body) > 4 << 20
    upstream.answers[PATH] = answer(body)
    with pytest.raises(RegistryError) as info:
        referrers(pull, route)
    assert info.value.status == 502


@pytest.mark.parametrize(
    "media_type", ["", "nonsense", "a/b c", "a/b\r\nX: y", "a/b/c", "é/x", "a/" + "b" * 200]
)
def test_artifact_types_are_media_types(media_type):
    with pytest.raises(RegistryError) as info:
        check_media_type(media_type)
    assert (info.value.status, info.value.code) == (400, "UNSUPPORTED")


class PagedUpstream(ScriptedUpstream):
    """Answers the referrers list in pages, chosen by the ``last`` parameter."""

    def __init__(self, pages: dict[str | None, Answer]) -> None:
        super().__init__()
        self.pages = pages
        self.params: list[Any] = []

    async def request(self, route: Any, method: str, path: str, *args: Any) -> Any:
        params = dict(args[1] or [])
        self.params.append(params)
        return ScriptedResponse(method, self.pages[params.get("last")])


def page(descriptor: dict[str, Any], link: str | None = None) -> Answer:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]})
    return answer(body.encode(), **({"Link": link} if link else {}))


def test_pages_are_followed_into_one_list(setup):  # noqa: F811
    clock, _, cache, pull, route = setup
    here = f"/v2/{route.repository}/referrers/{SUBJECT}"
    paged = PagedUpstream(
        {
            None: page(SIG, f'<{here}?n=1&last=b>; rel="next"'),
            "b": page(SBOM, f'<http://up{here}?n=1&last=c>; rel="next"'),
            "c": page({**SIG, "digest": "sha256:" + "d" * 64}),
        }
    )
    pull = PullService(paged, clock, cache.metrics, cache)  # type: ignore[arg-type]
    reply = referrers(pull, route)
    digests = [m["digest"] for m in json.loads(reply.body)["manifests"]]
    assert digests == [SIG["digest"], SBOM["digest"], "sha256:" + "d" * 64]
    assert paged.params == [{}, {"n": "1", "last": "b"}, {"n": "1", "last": "c"}]


@pytest.mark.parametrize(
    "link",
    [
        '<http://evil.example/v2/library/x/referrers/{subject}?last=b>; rel="next"',
        '</v2/other/repo/referrers/{subject}?last=b>; rel="next"',
        '</v2/library/x/referrers/{subject}?last=b>; rel="prev"',
    ],
)
def test_links_elsewhere_are_not_followed(setup, link):  # noqa: F811
    clock, _, cache, pull, route = setup
    paged = PagedUpstream({None: page(SIG, link.format(subject=SUBJECT))})
    pull = PullService(paged, clock, cache.metrics, cache)  # type: ignore[arg-type]
    assert json.loads(referrers(pull, route).body)["manifests"] == [SIG]
    assert len(paged.params) == 1


def test_endless_pages_are_a_502(setup):  # noqa: F811
    clock, _, cache, pull, route = setup
    here = f"/v2/{route.repository}/referrers/{SUBJECT}"
    paged = PagedUpstream({None: page(SIG, f'<{here}>; rel="next"')})
    pull = PullService(paged, clock, cache.metrics, cache)  # type: ignore[arg-type]
    with pytest.raises(RegistryError) as info:
        referrers(pull, route)
    assert info.value.status == 502 and "pages" in info.value.message
