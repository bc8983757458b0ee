"""Warm lists end to end: rounds against real registries, eviction, the CLI and metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import test_manhole
from .keys import admin
from .registries import LOOPBACK, free_port
from .test_cache import cached_blobs, metric, skopeo_pull
from .test_pull import assert_pulled, curl

MULTI_ARCH = [("linux", "amd64"), ("linux", "arm64")]


def warm_mirror(dockmirror, registry, images, cache=None, **warm):
    return dockmirror(
        {"hub": {"plugin": "registry", "url": registry.url, "default": True}},
        extra={"warm": {"images": images, "interval": "1h", **warm}, "cache": cache or {}},
    )


def warm_run(mirror) -> dict:
    """``dockmirror-admin warm run``: the round's result."""
    done = admin(mirror, "warm", "run", check=False)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def test_a_round_after_the_upstream_moved_a_tag_makes_the_next_pull_a_hit(
    registry_factory, dockmirror, seeded, unique_repo, tmp_path
):
    registry = registry_factory()
    old = seeded(registry, unique_repo, "v1", layers=[2000, 3000], platforms=MULTI_ARCH)
    mirror = warm_mirror(dockmirror, registry, [f"hub/{unique_repo}:v1"])
    first = warm_run(mirror)  # joins the round the start began, or runs another
    assert first["ok"] and first["results"][0]["digest"] == old.digest
    new = seeded(registry, unique_repo, "v1", layers=[2500, 3500], platforms=MULTI_ARCH)
    manifest_gets = registry.count_requests("GET", f"{unique_repo}/manifests/v1")
    # Until a round or the manifest_ttl, the mirror still has the old tag ...
    status, headers, body = curl(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
    assert (status, headers["x-cache"], body) == (200, "HIT", old.manifest)
    result = warm_run(mirror)
    assert result["ok"] and (result["updated"], result["failed"]) == (1, 0)
    [image] = result["results"]
    assert (image["image"], image["result"]) == (f"hub/{unique_repo}:v1", "updated")
    assert image["digest"] == new.digest
    assert image["fetched_bytes"] == sum(blob.size for blob in new.blobs)
    # ... the round asked with a HEAD, and fetched the moved tag once.
    assert registry.count_requests("HEAD", f"{unique_repo}/manifests/v1") >= 2
    assert registry.count_requests("GET", f"{unique_repo}/manifests/v1") == manifest_gets + 1
    # The pull is then all hits: no blob is asked of the upstream again.
    status, headers, body = curl(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
    assert (status, headers["x-cache"], body) == (200, "HIT", new.manifest)
    skopeo_pull(mirror, f"{unique_repo}:v1", tmp_path / "pulled")
    assert_pulled(tmp_path / "pulled", new)
    for blob in new.blobs:
        assert registry.count_requests("GET", f"/blobs/{blob.digest}") == 1, blob
    # A round with nothing new fetches nothing.
    again = warm_run(mirror)
    assert (again["unchanged"], again["fetched_bytes"]) == (1, 0)
    assert metric(mirror, 'dockmirror_warm_images{result="unchanged"}') == 1
    assert metric(mirror, "dockmirror_warm_fetched_bytes_total") >= image["fetched_bytes"]
    assert metric(mirror, 'dockmirror_warm_rounds_total{result="ok"}') >= 3
    assert metric(mirror, "dockmirror_warm_last_success_timestamp_seconds") > 1.7e9
    assert re.search(r"warm hub/\S+:v1: updated at sha256:", mirror.log_text())


def test_platforms_limit_what_is_warmed(registry_factory, dockmirror, seeded, unique_repo):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", platforms=MULTI_ARCH)
    mirror = warm_mirror(dockmirror, registry, [f"hub/{unique_repo}:v1"], platforms=["linux/arm64"])
    assert warm_run(mirror)["ok"]
    amd64, arm64 = image.platforms
    cached = cached_blobs(mirror)
    assert all(blob.digest in cached for blob in (arm64.config, *arm64.layers))
    assert not any(blob.digest in cached for blob in (amd64.config, *amd64.layers))


def test_warm_images_survive_eviction_up_to_max_share(
    registry_factory, dockmirror, seeded, unique_repo, tmp_path
):
    registry = registry_factory()
    kept = seeded(registry, f"{unique_repo}-kept", "v1", layers=[300_000])
    over = seeded(registry, f"{unique_repo}-over", "v1", layers=[300_000])
    mirror = warm_mirror(
        dockmirror,
        registry,
        [f"hub/{unique_repo}-kept:v1", f"hub/{unique_repo}-over:v1"],
        cache={"max_size": "1MiB"},
        max_share=0.5,
    )
    result = warm_run(mirror)
    assert result["ok"] and result["not_kept"] == [f"hub/{unique_repo}-over:v1"]
    assert 300_000 < result["kept_bytes"] <= (1 << 20) // 2
    others = [seeded(registry, f"{unique_repo}-{i}", "v1", layers=[300_000]) for i in range(4)]
    for i, other in enumerate(others):
        skopeo_pull(mirror, f"{unique_repo}-{i}:v1", tmp_path / f"out{i}")
        assert_pulled(tmp_path / f"out{i}", other)
        assert sum(cached_blobs(mirror).values()) <= 1 << 20
    cached = cached_blobs(mirror)
    assert all(blob.digest in cached for blob in kept.blobs)
    assert over.platforms[0].layers[0].digest not in cached
    assert metric(mirror, "dockmirror_warm_kept_bytes") == result["kept_bytes"]
    # The kept image still pulls with the upstream gone.
    registry.stop()
    skopeo_pull(mirror, f"{unique_repo}-kept:v1", tmp_path / "kept")
    assert_pulled(tmp_path / "kept", kept)


def test_a_failing_image_is_counted_and_the_cli_says_so(
    registry_factory, dockmirror, seeded, unique_repo
):
    registry = registry_factory()
    seeded(registry, unique_repo, "v1")
    mirror = warm_mirror(
        dockmirror, registry, [f"hub/{unique_repo}:v1", f"hub/{unique_repo}:missing"]
    )
    done = admin(mirror, "warm", "run", check=False)
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert (result["ok"], result["unchanged"] + result["updated"], result["failed"]) == (
        False,
        1,
        1,
    )
    assert result["results"][1]["result"] == "failed"
    assert "not found" in result["results"][1]["error"]
    assert metric(mirror, "dockmirror_warm_failures_total") >= 1
    assert metric(mirror, 'dockmirror_warm_rounds_total{result="failed"}') >= 1
    assert metric(mirror, 'dockmirror_warm_images{result="failed"}') == 1


def test_the_cli_without_a_warm_list_or_a_server(plain_registry, dockmirror, tmp_path):
    mirror = dockmirror({"hub": {"plugin": "registry", "url": plain_registry.url}})
    done = admin(mirror, "warm", "run", check=False)
    assert (done.returncode, done.stdout) == (1, "")
    assert "no [warm] images are configured" in done.stderr
    socket = mirror.database_path.parent / "control.sock"
    assert socket.stat().st_mode & 0o777 == 0o600
    mirror.stop()
    done = admin(mirror, "warm", "run", check=False)
    assert done.returncode == 1 and "dockmirror is not running" in done.stderr


def test_a_round_from_the_manhole(registry_factory, dockmirror, seeded, unique_repo, tmp_path):
    registry = registry_factory()
    seeded(registry, unique_repo, "v1")
    port = free_port()
    operator = test_manhole.keypair(tmp_path, "operator")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(Path(f"{operator}.pub").read_text())
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": registry.url, "default": True}},
        extra={
            "warm": {"images": [f"hub/{unique_repo}:v1"]},
            "manhole": {
                "listen": f"tcp:{port}:interface={LOOPBACK}",
                "authorized_keys": str(authorized),
            },
        },
    )
    session = test_manhole.Session(port, operator)
    try:
        session.expect(">>> ")
        session.send("warm")
        session.expect(r"<warm: 1 images every 21600s, \w+, .*run\(\), last>")
        session.send("warm.run()")
        session.expect(r"Deferred #0 called back: <warm round: \{'ok': True, 'images': 1,")
        session.send("warm.last.ok")
        session.expect(r"\nTrue\r?\n")
        assert session.close() == 0
    finally:
        session.close()
    assert metric(mirror, 'dockmirror_warm_rounds_total{result="ok"}') >= 1
