"""The manifest cache: Accept negotiation, references, tags and their TTL."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from dockmirror.cache.index import Index
from dockmirror.cache.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1,
    SCHEMA1_SIGNED,
    ManifestCache,
    accepted,
    manifest_media_type,
    references,
)

from ._cache_support import Claims, make_store, run_now, sha256

ORIGIN = "hub/library/alpine https://registry-1.docker.io"


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        ("", None),
        ("*/*", None),
        (f"{OCI_INDEX}, {DOCKER_MANIFEST}", {OCI_INDEX, DOCKER_MANIFEST}),
        (f"{OCI_INDEX};q=0, {DOCKER_MANIFEST}; q=0.5", {DOCKER_MANIFEST}),
        (f"{DOCKER_LIST}, application/*", None),
    ],
)
def test_accepted(header, expected):
    assert accepted(header) == expected


def test_references_of_every_manifest_kind():
    manifest = {
        "config": {"digest": "sha256:" + "c" * 64, "size": 10},
        "layers": [{"digest": "sha256:" + "1" * 64, "size": 20}, {"digest": "nope"}],
    }
    assert references(json.dumps(manifest).encode()) == [
        ("sha256:" + "c" * 64, 10),
        ("sha256:" + "1" * 64, 20),
    ]
    index = {"manifests": [{"digest": "sha256:" + "a" * 64, "size": -1}]}
    assert references(json.dumps(index).encode()) == [("sha256:" + "a" * 64, None)]
    schema1 = {"fsLayers": [{"blobSum": "sha256:" + "b" * 64}]}
    assert references(json.dumps(schema1).encode()) == [("sha256:" + "b" * 64, None)]
    assert references(b"not json") == references(b"[]") == []
    hostile = {"layers": [{"digest": "sha256:../../etc/passwd"}, {"digest": "md5:" + "a" * 32}]}
    assert references(json.dumps(hostile).encode()) == []


def make_cache(tmp_path, clock, **kwargs):
    store = make_store(tmp_path, clock=clock)
    index = Index(str(tmp_path / "i.sqlite"), clock, run_now)
    return ManifestCache(store, index, clock, 60, **kwargs)


def put(cache, reference, body, media_type):
    digest = sha256(body)
    Deferred.fromCoroutine(cache.put(ORIGIN, reference, digest, media_type, body))
    return digest


def test_each_client_gets_a_tag_entry_it_accepts(tmp_path):
    clock = MemoryReactorClock()
    cache = make_cache(tmp_path, clock)
    layer = "sha256:" + "1" * 64
    single = json.dumps({"layers": [{"digest": layer, "size": 5}]}).encode()
    listing = json.dumps({"manifests": [{"digest": sha256(single), "size": 1}]}).encode()
    single_digest = put(cache, "v1", single, DOCKER_MANIFEST)
    list_digest = put(cache, "v1", listing, DOCKER_LIST)
    assert cache.tag(ORIGIN, "v1", None).digest == list_digest
    assert cache.tag(ORIGIN, "v1", {DOCKER_MANIFEST}).digest == single_digest
    assert cache.tag(ORIGIN, "v1", {OCI_INDEX}) is None
    assert cache.tag("other " + ORIGIN, "v1", None) is None
    # The manifests are readable through the origin that served them.
    assert cache.store.allowed(ORIGIN, single_digest) and cache.store.allowed(ORIGIN, list_digest)
    assert cache.get(list_digest) == (listing, DOCKER_LIST)


def test_tags_expire_after_the_ttl(tmp_path):
    clock = MemoryReactorClock()
    cache = make_cache(tmp_path, clock)
    put(cache, "v1", b"{}", DOCKER_MANIFEST)
    entry = cache.tag(ORIGIN, "v1", None)
    assert cache.fresh(entry)
    clock.advance(60)
    assert not cache.fresh(entry)
    cache.set_tag(ORIGIN, "v1", entry.digest, entry.media_type)
    assert cache.fresh(cache.tag(ORIGIN, "v1", None))


def test_an_evicted_manifest_is_no_longer_served(tmp_path):
    cache = make_cache(tmp_path, MemoryReactorClock())
    digest = put(cache, "v1", b"{}", DOCKER_MANIFEST)
    cache.store.forget(digest)
    assert cache.get(digest) is None
    assert cache.tag(ORIGIN, "v1", None) is None


def test_a_manifest_mention_proves_nothing(tmp_path):
    clock = MemoryReactorClock()
    cache = make_cache(tmp_path, clock)
    private = "corp/team/app https://registry.corp.example"
    secret = sha256(b"private layer")
    Deferred.fromCoroutine(cache.store.put_small(secret, b"private layer"))
    cache.store.allow(private, secret)
    same_upstream = "hub/library/other https://registry-1.docker.io"
    shared = sha256(b"shared layer")
    Deferred.fromCoroutine(cache.store.put_small(shared, b"shared layer"))
    cache.store.allow(same_upstream, shared)
    unknown = "sha256:" + "2" * 64
    body = json.dumps(
        {"layers": [{"digest": d, "size": 10**13} for d in (secret, shared, unknown)]}
    ).encode()
    digest = put(cache, "v1", body, DOCKER_MANIFEST)
    # Another upstream's blob, the same upstream's, and one not held yet all
    # need this repository's own word (a HEAD or a fetch); sizes too.
    assert cache.store.allowed(ORIGIN, digest)
    for named in (secret, shared, unknown):
        assert not cache.store.allowed(ORIGIN, named)
    assert cache.store.size_of(unknown, ORIGIN) is None
    assert cache.store.size_of(shared, ORIGIN) == len(b"shared layer")


@pytest.mark.parametrize(
    "body, content_type, expected",
    [
        (
            b'{"schemaVersion": 2, "mediaType": "%s"}' % DOCKER_MANIFEST.encode(),
            None,
            DOCKER_MANIFEST,
        ),
        (
            b'{"schemaVersion": 2, "mediaType": "%s"}' % DOCKER_LIST.encode(),
            DOCKER_LIST,
            DOCKER_LIST,
        ),
        (b'{"schemaVersion": 2, "manifests": []}', "application/json", OCI_INDEX),
        (b'{"schemaVersion": 2, "layers": []}', f"{OCI_MANIFEST}; charset=utf-8", OCI_MANIFEST),
        (b'{"schemaVersion": 1, "signatures": []}', None, SCHEMA1_SIGNED),
        (b'{"schemaVersion": 1}', "application/json", SCHEMA1),
        # Pages, and JSON that is no manifest:
        (b"<html>Sign in</html>", "text/html; charset=utf-8", None),
        (b"<html>Sign in</html>", DOCKER_MANIFEST, None),
        (b'{"schemaVersion": 2}', "text/html", None),
        (b'{"login": "required"}', "application/json", None),
        (b'["schemaVersion", 2]', DOCKER_MANIFEST, None),
        (b'{"schemaVersion": true}', None, None),
        (b'{"schemaVersion": 2, "mediaType": "text/html"}', None, None),
        (b'{"schemaVersion": 2, "mediaType": "%s"}' % OCI_INDEX.encode(), DOCKER_MANIFEST, None),
    ],
)
def test_what_an_upstream_served_is_a_manifest_only_if_it_is_one(body, content_type, expected):
    assert manifest_media_type(body, content_type) == expected


def test_an_evicted_manifest_takes_its_tags_along(tmp_path):
    cache = make_cache(tmp_path, MemoryReactorClock())
    kept = put(cache, "kept", b'{"schemaVersion": 2, "n": 0}', DOCKER_MANIFEST)
    for i in range(100):
        digest = put(cache, f"v{i}", b'{"schemaVersion": 2, "n": %d}' % (i + 1), DOCKER_MANIFEST)
        cache.set_tag("other " + ORIGIN, f"v{i}", digest, DOCKER_MANIFEST)
        cache.store.forget(digest)
    # Only the tag of the manifest still cached is held in memory.
    assert cache.stats()["tags"] == 1 and list(cache._tags) == [(ORIGIN, "kept")]
    assert set(cache._tagged) == {kept}
    cache.set_tag(ORIGIN, "kept", sha256(b"other"), DOCKER_MANIFEST)  # the tag moved
    cache.forget_tag(ORIGIN, "kept")
    assert cache._tags == {} and cache._tagged == {}


def test_the_least_recently_used_tags_beyond_max_tags_are_dropped(tmp_path):
    """A catch-all upstream answering every tag name asked for fills no more than max_tags."""
    clock = MemoryReactorClock()
    cache = make_cache(tmp_path, clock, max_tags=3)
    cache._index.load()
    digest = put(cache, "v0", b"{}", DOCKER_MANIFEST)
    put(cache, "v0", b"[]", OCI_MANIFEST)  # two entries, one tag
    for i in range(1, 10):
        clock.advance(1)
        cache.set_tag(ORIGIN, f"v{i}", digest, DOCKER_MANIFEST)
        assert cache.tag(ORIGIN, "v0", None) is not None  # used: kept
    assert list(cache._tags) == [(ORIGIN, "v8"), (ORIGIN, "v9"), (ORIGIN, "v0")]
    assert cache._tagged[digest] == set(cache._tags)
    # Dropped from the index too; a new process (with a lower max_tags, say) keeps
    # the tags resolved last.
    cache._index.flush()
    assert sorted({row[1] for row in cache._index.load().tags}) == ["v0", "v8", "v9"]
    again = ManifestCache(cache.store, cache._index, clock, 60, max_tags=2)
    again.recover(cache._index.load())
    assert list(again._tags) == [(ORIGIN, "v8"), (ORIGIN, "v9")]
    cache._index.flush()
    assert sorted({row[1] for row in cache._index.load().tags}) == ["v8", "v9"]


def test_a_manifest_another_worker_fetched_is_taken_in_if_sound(tmp_path):
    clock = MemoryReactorClock()
    fetcher, worker = make_cache(tmp_path, clock), make_cache(tmp_path, clock)
    worker.store.coordinator = Claims()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()
    digest = put(fetcher, "v1", body, OCI_MANIFEST)
    fetcher._index.flush()
    for bad in (
        [ORIGIN, "v1", digest],
        [ORIGIN, "v1", digest, "text/html"],
        [ORIGIN, "../v1", digest, OCI_MANIFEST],
        [ORIGIN, "v1", "sha256:" + "0" * 64, OCI_MANIFEST],  # not in the cache
        [ORIGIN, "v1", "sha256:../../etc", OCI_MANIFEST],
        ["x" * 5000, "v1", digest, OCI_MANIFEST],
    ):
        worker.fetched_elsewhere(bad)
        assert worker.tag(ORIGIN, "v1", None) is None and worker.stats()["tags"] == 0
    worker.fetched_elsewhere([ORIGIN, "v1", digest, OCI_MANIFEST])
    entry = worker.tag(ORIGIN, "v1", None)
    assert entry is not None and entry.digest == digest and worker.fresh(entry)
    assert worker.get(digest) == (body, OCI_MANIFEST)
    assert worker.store.allowed(ORIGIN, digest)


class ClusterTags:
    """Tag entries of other nodes, as ``cache_tags`` holds them."""

    def __init__(self, rows):
        self.rows = rows
        self.asked: list[float] = []

    async def tags(self, origin, tag, since):
        self.asked.append(since)
        return [row for row in self.rows if row[3] > since]

    def publish(self, *args):
        pass


def test_another_nodes_tag_is_taken_while_fresh_or_when_told_stale_will_do(tmp_path):
    clock = MemoryReactorClock()
    clock.advance(1000)
    cache = make_cache(tmp_path, clock)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    forged = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}}).encode()
    rows = [
        (OCI_MANIFEST, sha256(body), body, 900.0),  # resolved 100 s ago; the TTL is 60 s
        (DOCKER_MANIFEST, sha256(body), forged, 950.0),  # not the manifest it names
    ]
    cache.shared = ClusterTags(rows)  # type: ignore[assignment]

    def adopt(stale: bool) -> bool:
        done: list[bool] = []
        Deferred.fromCoroutine(cache.adopt_tag(ORIGIN, "v1", stale=stale)).addCallback(done.append)
        return done[0]

    assert not adopt(stale=False)
    assert cache.tag(ORIGIN, "v1", None) is None
    assert adopt(stale=True)
    entry = cache.tag(ORIGIN, "v1", None)
    assert (entry.digest, entry.media_type, entry.checked) == (sha256(body), OCI_MANIFEST, 900.0)
    assert not cache.fresh(entry)
    assert cache.tag(ORIGIN, "v1", {DOCKER_MANIFEST}) is None
    assert cache.get(sha256(body)) == (body, OCI_MANIFEST)
    assert cache.shared.asked == [940.0, float("-inf")]


class ClusterManifests(ClusterTags):
    """A node holding manifests, and the proofs given to any node."""

    def __init__(self, served: bytes, proved: bool) -> None:
        super().__init__([])
        self.served = served
        self.proved = proved

    async def manifest(self, digest, limit):
        return self.served

    async def proof(self, origin, digest):
        return len(self.served) if self.proved else None


@pytest.mark.parametrize(
    "served, proved, taken",
    [
        ("right", True, True),
        ("right", False, False),
        ("forged", True, False),
        ("another type", True, False),
    ],
)
def test_a_manifest_another_node_holds_is_taken_if_proved_and_sound(
    tmp_path, served, proved, taken
):
    """A node trusts no other with a manifest's content, nor with who may read it."""
    clock = MemoryReactorClock()
    cache = make_cache(tmp_path, clock)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    bodies = {
        "right": body,
        "forged": json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode(),
        "another type": json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST}).encode(),
    }
    digest = sha256(body) if served != "another type" else sha256(bodies[served])
    shared = ClusterManifests(bodies[served], proved)
    cache.shared = shared  # type: ignore[assignment]
    cache.store.proofs_elsewhere = shared.proof
    done: list[bool] = []
    adopting = cache.adopt_manifest(ORIGIN, digest, OCI_MANIFEST, 1 << 20)
    Deferred.fromCoroutine(adopting).addCallback(done.append)
    assert done == [taken]
    assert cache.has(digest) is taken
    if taken:
        assert cache.get(digest) == (body, OCI_MANIFEST)
        assert cache.store.allowed(ORIGIN, digest)
