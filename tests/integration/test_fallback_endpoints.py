"""Fallback endpoints: the primary down and back, and mirrors that may not resolve tags.

Two real registries play the primary and a mirror of the same upstream.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from .images import Image, make_image, pull, push
from .registries import http_status, wait_until
from .test_pull import assert_pulled, curl, error_code
from .upstream_servers import Relay

BACKOFF_FIRST = 5.0  # dockmirror.endpoints.BACKOFF_FIRST


def _hub(primary, *mirrors: object) -> dict[str, object]:
    upstreams = {"hub": {"plugin": "dockerhub", "url": primary.url, "default": True}}
    upstreams["hub"]["mirrors"] = list(mirrors)
    return upstreams


def _endpoint_state(mirror, registry) -> float | None:
    status, _, body = curl(f"{mirror.url}/metrics")
    assert status == 200
    label = f'endpoint="{registry.host}"'
    for line in body.decode().splitlines():
        if line.startswith("dockmirror_upstream_endpoint_state{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def _healthz(mirror) -> dict[str, object]:
    status, _, body = curl(f"{mirror.url}/healthz")
    document = json.loads(body)
    assert status == 200 and document["status"] == "ok", document  # the cache still serves
    return dict(document["upstreams"]["hub"])


def _push_to(layout: Path, image: Image, repo: str, *registries) -> None:
    for registry in registries:
        push(layout, image.tag, registry.host, repo, registry.creds)


def test_the_primary_down_then_back(
    registry_factory, dockmirror, unique_repo, tmp_path, tmp_path_factory
):
    primary, backup = registry_factory(), registry_factory()
    layout = tmp_path_factory.mktemp("layout")
    first = make_image(layout, "v1")
    _push_to(layout, first, unique_repo, primary, backup)
    mirror = dockmirror(_hub(primary, {"url": backup.url, "trust_tags": True}))
    assert _endpoint_state(mirror, primary) == 0
    assert _endpoint_state(mirror, backup) == 0

    primary.stop()
    pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "first")
    assert_pulled(tmp_path / "first", first)
    assert _endpoint_state(mirror, primary) == 2  # open: skipped
    assert _endpoint_state(mirror, backup) == 0
    health = _healthz(mirror)
    assert health[primary.host]["state"] == "open", health
    assert health[backup.host] == {"state": "closed", "trust_tags": True}
    served_by_backup = backup.count_requests("GET", f"/v2/{unique_repo}/blobs/")
    assert served_by_backup == len(first.blobs)

    primary.start()
    second = make_image(layout, "v2")
    _push_to(layout, second, unique_repo, primary, backup)
    # While its backoff lasts, the primary is skipped even though it is back.
    pull(f"{mirror.host}/{unique_repo}:v2", tmp_path / "skipped")
    assert primary.count_requests("GET", f"/v2/{unique_repo}/") == 0
    time.sleep(BACKOFF_FIRST + 0.5)
    third = make_image(layout, "v3")
    _push_to(layout, third, unique_repo, primary, backup)
    pull(f"{mirror.host}/{unique_repo}:v3", tmp_path / "third")
    assert_pulled(tmp_path / "third", third)
    assert primary.count_requests("GET", f"/v2/{unique_repo}/manifests/v3") == 1
    assert backup.count_requests("GET", f"/v2/{unique_repo}/manifests/v3") == 0
    assert _endpoint_state(mirror, primary) == 0
    assert _healthz(mirror)[primary.host]["state"] == "closed"
    wait_until(lambda: f"endpoint {primary.host} is back" in mirror.log_text())
    assert "Traceback" not in mirror.log_text()


def test_an_untrusted_mirror_never_resolves_a_tag(
    registry_factory, dockmirror, unique_repo, tmp_path, tmp_path_factory
):
    primary, other = registry_factory(), registry_factory()
    layout_a, layout_b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    a = make_image(layout_a, "v1")
    _push_to(layout_a, a, unique_repo, primary, other)
    b = make_image(layout_b, "v1")  # the mirror's v1 is another image
    _push_to(layout_b, b, unique_repo, other)
    untrusted = _hub(primary, other.url)
    extra = {"cache": {"manifest_ttl": 0}}

    mirror = dockmirror(untrusted, extra=extra)
    pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "a")
    assert_pulled(tmp_path / "a", a)
    primary.stop()
    # The tag cannot be revalidated by a trusted endpoint: the cached one is served stale.
    status, headers, _ = curl(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
    assert (status, headers["x-cache"], headers["docker-content-digest"]) == (
        200,
        "STALE",
        a.digest,
    )

    fresh = dockmirror(untrusted, extra=extra)
    status, _, body = curl(f"{fresh.url}/v2/{unique_repo}/manifests/v1")
    assert (status, error_code(body)) == (503, "UNAVAILABLE"), body
    # By digest, any endpoint serves: the content is checked against the digest.
    pull(f"{fresh.host}/{unique_repo}@{a.digest}", tmp_path / "by-digest")
    assert_pulled(tmp_path / "by-digest", a)
    assert other.count_requests("GET", f"/v2/{unique_repo}/manifests/v1") == 0
    assert other.count_requests("HEAD", f"/v2/{unique_repo}/manifests/v1") == 0

    trusting = dockmirror(_hub(primary, {"url": other.url, "trust_tags": True}), extra=extra)
    pull(f"{trusting.host}/{unique_repo}:v1", tmp_path / "b")
    assert_pulled(tmp_path / "b", b)
    for m in (mirror, fresh, trusting):
        assert "Traceback" not in m.log_text()
    assert http_status(f"{other.url}/v2/") == 200


def test_a_mirror_gets_its_own_credentials_never_the_primary_s(
    registry_factory, plain_registry, dockmirror, unique_repo, tmp_path, tmp_path_factory
):
    primary = registry_factory("htpasswd")
    layout = tmp_path_factory.mktemp("layout")
    image = make_image(layout, "v1")
    _push_to(layout, image, unique_repo, primary, plain_registry)
    user, password = primary.creds
    own = "Basic " + base64.b64encode(b"mirror-user:mirror-pass").decode()
    nobody = "Basic " + base64.b64encode(b"nobody:nothing").decode()
    by_digest = f"/v2/{unique_repo}/manifests/{image.digest}"
    primary.stop()
    with Relay(plain_registry.url, basic=nobody) as stranger:
        upstreams = _hub(primary, stranger.url)
        upstreams["hub"].update(username=user, password=password)
        mirror = dockmirror(upstreams)
        status, _, body = curl(f"{mirror.url}{by_digest}")
        assert (status, error_code(body)) == (403, "DENIED"), body
        # It asked for Basic credentials: it got none, the primary's least of all.
        assert stranger.received and {r.authorization for r in stranger.received} == {None}
    with Relay(plain_registry.url, basic=own) as private:
        mirrors = {"url": private.url, "username": "mirror-user", "password": "mirror-pass"}
        upstreams = _hub(primary, mirrors)
        upstreams["hub"].update(username=user, password=password)
        mirror = dockmirror(upstreams)
        pull(f"{mirror.host}/{unique_repo}@{image.digest}", tmp_path / "private")
        assert_pulled(tmp_path / "private", image)
        assert {r.authorization for r in private.received} == {None, own}
