"""A cluster on S3 and PostgreSQL answers pulls by tag with its upstream down.

Tags live in PostgreSQL (``cache_tags``), manifests and blobs in the bucket:
a node that joins with an empty cache directory while the upstream is down
still serves an image by tag and by digest, as the cluster last saw it.
"""

from __future__ import annotations

from .conftest import Dockmirror, DockmirrorFactory
from .images import pull
from .registries import LOOPBACK, Registry, free_port, wait_until
from .test_pull import MULTI_ARCH, assert_pulled, curl
from .test_storage import objects


def node(
    dockmirror: DockmirrorFactory, registry: Registry, s3, postgres: str, **cache: object
) -> Dockmirror:
    port = free_port()
    cluster = {
        "database": postgres,
        "listen": f"tcp:{port}:interface={LOOPBACK}",
        "node_url": f"http://{LOOPBACK}:{port}",
    }
    extra = {"storage": s3.storage_table(), "cluster": cluster, "cache": cache}
    return dockmirror(
        {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}}, extra=extra
    )


def test_a_new_node_pulls_by_tag_from_postgresql_and_the_bucket_with_the_upstream_down(
    registry_factory, dockmirror, seeded, unique_repo, s3, postgres, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[2 << 20, 300_000], platforms=MULTI_ARCH)
    first = node(dockmirror, registry, s3, postgres)
    pull(f"{first.host}/{unique_repo}:v1", tmp_path / "first")
    assert_pulled(tmp_path / "first", image)
    blobs = {b.digest for p in image.platforms for b in (p.config, *p.layers)}
    manifests = {image.digest, *(p.digest for p in image.platforms)}
    wait_until(lambda: len(objects(s3)) == len(blobs | manifests), timeout=30)
    registry.stop()
    first.stop()

    # With the tag still fresh, and long expired (a TTL of 0): both from the cluster.
    for ttl, x_cache in ((3600, "HIT"), (0, "STALE")):
        fresh = node(dockmirror, registry, s3, postgres, manifest_ttl=ttl)
        accept = ("-H", f"Accept: {image.media_type}")
        status, headers, body = curl(*accept, f"{fresh.url}/v2/{unique_repo}/manifests/v1")
        assert (status, body, headers["x-cache"]) == (200, image.manifest, x_cache), body
        out = tmp_path / f"ttl-{ttl}"
        pull(f"{fresh.host}/{unique_repo}:v1", out)
        assert_pulled(out, image)
        pull(f"{fresh.host}/{unique_repo}@{image.digest}", tmp_path / f"digest-{ttl}")
        assert_pulled(tmp_path / f"digest-{ttl}", image)
        # A tag the cluster never saw is an error in the registry's format.
        status, _, body = curl(f"{fresh.url}/v2/{unique_repo}/manifests/v2")
        assert status in (502, 503) and b'"errors"' in body, body
        assert "Traceback" not in fresh.log_text()
