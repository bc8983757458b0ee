"""The blob store: quota, LRU, pins, start-up recovery, and the operator's view."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from dockmirror.cache import Cache, entries
from dockmirror.cache.fill import WRITE_DELAY, Fill
from dockmirror.cache.index import Index
from dockmirror.config import CacheConfig
from dockmirror.metrics import Metrics
from dockmirror.streaming import StreamError

from ._cache_support import Claims, FakeResponse, HeldRunner, make_store, run_now, sha256

MiB = 1 << 20


def put(store, data: bytes) -> str:
    digest = sha256(data)
    d = Deferred.fromCoroutine(store.put_small(digest, data))
    assert d.result is True
    return digest


def blob(n: int, fill: bytes = b"x") -> bytes:
    return os.urandom(8) + fill * (n - 8)


def test_eviction_takes_the_least_recently_used_first(tmp_path):
    store = make_store(tmp_path, max_size=1000)
    a, b = put(store, blob(400)), put(store, blob(400))
    store.touch(a)
    fill = store.begin_fill(sha256(b"c"), 400, "up")
    assert isinstance(fill, Fill)
    assert store.has(a) and not store.has(b)
    assert not os.path.exists(store.path(b))
    assert store.size + store.reserved <= 1000
    assert store.metrics.evictions._value.get() == 1


def test_blobs_being_read_or_filled_are_never_evicted(tmp_path):
    store = make_store(tmp_path, max_size=1000)
    a = put(store, blob(400))
    reader = store.reader(a, 0, 400, lambda n: None)
    filling = store.begin_fill(sha256(b"b"), 400, "up")
    assert isinstance(filling, Fill)
    assert store.begin_fill(sha256(b"c"), 400, "up") == "cache full of blobs in use"
    assert store.has(a)
    reader.write_to(StringTransport())  # reads it all, then unpins
    assert isinstance(store.begin_fill(sha256(b"c"), 400, "up"), Fill)
    assert not store.has(a)


def test_a_blob_larger_than_the_cache_is_refused(tmp_path):
    store = make_store(tmp_path, max_size=1000)
    assert store.begin_fill(sha256(b"big"), 1001, "up") == "larger than the cache"


@pytest.mark.parametrize("shared", [False, True])
def test_a_fill_reserves_what_arrives_not_what_the_upstream_announces(tmp_path, shared):
    store = make_store(tmp_path, max_size=16 * MiB)
    if shared:  # the reservation is counted in this process's slot
        store.coordinator = Claims()
    cached = []
    for _ in range(4):
        cached.append(put(store, blob(4 * MiB)))
        store.reactor.advance(1)
    # Announced just under the quota: the first step is reserved, one blob evicted.
    fill = store.begin_fill(sha256(b"liar"), 16 * MiB - 1, "up")
    assert isinstance(fill, Fill)
    assert [store.has(d) for d in cached] == [False, True, True, True]
    assert fill.reserved == store.reserved == store.reserve_step == MiB
    assert store._used() == 13 * MiB
    response = FakeResponse(fill.size)
    Deferred.fromCoroutine(fill.start(response))
    response.send(b"x" * 10)
    response.end()
    assert "sent 10 of" in str(fill.error)
    assert store.reserved == store.promised == 0 and store._used() == 12 * MiB
    assert store.metrics.evictions._value.get() == 1


def test_fills_are_admitted_only_if_their_announced_sizes_could_fit(tmp_path):
    """What the fills in progress announced is never evicted for, but counted: the
    fills admitted together find room for their later steps."""
    store = make_store(tmp_path, max_size=16 * MiB)
    kept = put(store, blob(4 * MiB))
    first = store.begin_fill(sha256(b"first"), 8 * MiB, "up")
    assert isinstance(first, Fill) and store.has(kept)
    assert store.reserved == MiB and store.promised == 7 * MiB
    reader = store.reader(kept, 0, MiB, lambda n: None)  # pinned: cannot make room
    assert store.begin_fill(sha256(b"second"), 8 * MiB, "up") == "cache full of blobs in use"
    assert store.reserved == MiB and store.promised == 7 * MiB
    reader.stopProducing()
    second = store.begin_fill(sha256(b"second"), 8 * MiB, "up")
    assert isinstance(second, Fill) and store.has(kept)  # evicted only once needed
    assert store.reserved == 2 * MiB and store.promised == 14 * MiB
    first.abandon(StreamError("stop"))
    second.abandon(StreamError("stop"))
    assert store.reserved == store.promised == 0


def test_bytes_past_the_reservation_wait_for_the_room_made_for_them(tmp_path):
    store = make_store(tmp_path, max_size=16 * MiB)
    cached = [put(store, blob(2 * MiB)) for _ in range(8)]
    disk = store._run = HeldRunner()  # type: ignore[method-assign]
    data = os.urandom(3 * MiB)
    fill = store.begin_fill(sha256(data), len(data), "up")
    assert isinstance(fill, Fill) and fill.reserved == MiB
    response = FakeResponse(len(data))
    Deferred.fromCoroutine(fill.start(response))
    disk.run_all()  # the first blob removed, then the file made
    response.send(data[:MiB])
    disk.run_all()
    assert fill.written == MiB and not store.has(cached[0]) and store.has(cached[1])
    # One byte past the reservation: a step more, for which the next blob goes ...
    response.send(data[MiB : MiB + 1])
    assert fill.reserved == 2 * MiB + 1 and store.size + store.reserved <= 16 * MiB
    assert not store.has(cached[1]) and os.path.exists(store.path(cached[1]))
    # ... and the byte is written only once its file is gone.
    store.reactor.advance(WRITE_DELAY)
    assert [job.__name__ for job, _, _ in disk.queue] == ["remove"]
    disk.run_queued()
    assert not os.path.exists(store.path(cached[1]))
    store.reactor.advance(WRITE_DELAY)
    assert [job.__name__ for job, _, _ in disk.queue] == ["_write"]
    disk.run_all()
    assert fill.written == MiB + 1
    response.send(data[MiB + 1 :])
    response.end()
    disk.run_all()
    assert fill.committed and store.has(sha256(data))
    assert store.reserved == 0 and store.size == 15 * MiB
    assert store.metrics.evictions._value.get() == 2


def test_a_growing_fill_counts_the_blob_it_is_removing_as_free(tmp_path):
    """Every process counts a blob until its file is gone: the next steps of a fill
    in a shared directory must not evict another blob for the same bytes."""
    disk = HeldRunner()
    store = make_store(tmp_path, max_size=16 * MiB, run=disk)
    store.coordinator = Claims()
    cached = []
    for _ in range(3):
        data = blob(4 * MiB)
        stored = Deferred.fromCoroutine(store.put_small(sha256(data), data))
        disk.run_all()
        assert stored.result is True
        cached.append(sha256(data))
        store.reactor.advance(1)
    data = os.urandom(8 * MiB)
    fill = store.begin_fill(sha256(data), len(data), "up")
    assert isinstance(fill, Fill)
    response = FakeResponse(len(data))
    Deferred.fromCoroutine(fill.start(response))
    disk.run_all()
    for offset in range(0, len(data), MiB):  # the disk is slow: the evicted file stays
        response.send(data[offset : offset + MiB])
    assert [store.has(d) for d in cached] == [False, True, True]
    assert store.metrics.evictions._value.get() == 1
    response.end()
    disk.run_all()
    store.reactor.advance(WRITE_DELAY)
    disk.run_all()
    assert fill.committed and store._used() == 16 * MiB


def test_a_fill_with_no_room_for_its_next_step_fails(tmp_path):
    store = make_store(tmp_path, max_size=2 * MiB)
    data = os.urandom(2 * MiB)
    fill = store.begin_fill(sha256(data), len(data), "up")
    assert isinstance(fill, Fill) and fill.reserved == MiB
    response = FakeResponse(len(data))
    Deferred.fromCoroutine(fill.start(response))
    reader = store.reader(put(store, blob(MiB)), 0, MiB, lambda n: None)  # pinned
    response.send(data[: MiB + 1])
    assert "no room left in the cache: cache full of blobs in use" in str(fill.error)
    assert response.transport.stopped
    assert store.reserved == 0 and store.filling(sha256(data)) is None
    reader.stopProducing()


def test_access_is_per_origin(tmp_path):
    store = make_store(tmp_path)
    digest = put(store, b"data")
    store.allow("hub/library/alpine https://hub", digest)
    assert store.allowed("hub/library/alpine https://hub", digest)
    assert not store.allowed("corp/library/alpine https://corp", digest)


def test_recovery_checks_the_index_against_the_disk(tmp_path):
    store = make_store(tmp_path)
    kept, wrong, missing = (put(store, blob(100)) for _ in range(3))
    store.allow("hub/x https://hub", kept)
    store._index.flush()
    Path(store.path(wrong)).write_bytes(b"short")
    os.remove(store.path(missing))
    adopted_data = b"adopted"
    adopted = sha256(adopted_data)
    Path(store.path(adopted)).parent.mkdir(parents=True, exist_ok=True)
    Path(store.path(adopted)).write_bytes(adopted_data)
    Path(store.temp_dir, "abc.123").write_bytes(b"partial")
    stray = Path(store.blobs_dir, "sha256", "ab", "not-a-digest")
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"?")
    store._index.close()

    again = make_store(tmp_path)
    assert again.has(kept) and again.has(adopted)
    assert not again.has(wrong) and not again.has(missing)
    assert not os.path.exists(again.path(wrong)) and not stray.exists()
    assert os.listdir(again.temp_dir) == []
    assert again.size == 100 + len(adopted_data)
    assert again.allowed("hub/x https://hub", kept)


def test_a_lowered_quota_is_applied_at_start(tmp_path):
    clock = MemoryReactorClock()
    store = make_store(tmp_path, clock=clock)
    digests = []
    for _ in range(3):
        clock.advance(1)
        digests.append(put(store, blob(400)))
    store._index.close()
    again = make_store(tmp_path, max_size=1000)
    assert again.size <= 1000
    assert [again.has(d) for d in digests] == [False, True, True]


def test_an_unusable_index_is_set_aside(tmp_path):
    path = tmp_path / "index.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    index = Index(str(path), MemoryReactorClock(), run_now)
    assert index.load().blobs == []
    assert any(p.name.startswith("index.sqlite.unusable-") for p in tmp_path.iterdir())


def make_cache(tmp_path) -> Cache:
    config = CacheConfig(directory=str(tmp_path / "cache"), max_size="1MiB")
    cache = Cache(config, MemoryReactorClock(), Metrics(), run=run_now, run_index=run_now)
    cache.startService()
    return cache


def test_purge_a_repository_keeps_what_others_share(tmp_path):
    cache = make_cache(tmp_path)
    shared, own = put(cache.blobs, b"shared"), put(cache.blobs, b"own")
    cache.blobs.allow("hub/library/a https://hub", shared)
    cache.blobs.allow("hub/library/a https://hub", own)
    cache.blobs.allow("hub/library/b https://hub", shared)
    cache.manifests.set_tag("hub/library/a https://hub", "v1", own, "x")
    result = cache.purge("library/a")
    assert result == {
        "repositories": ["hub/library/a"],
        "tags": 1,
        "purged": [own],
        "kept": {},
    }
    assert cache.blobs.has(shared) and not cache.blobs.has(own)
    assert cache.purge("library/a")["error"].startswith("nothing cached for library/a (")


def test_purge_a_digest(tmp_path):
    cache = make_cache(tmp_path)
    digest = put(cache.blobs, b"data")
    assert cache.purge(digest) == {"purged": [digest]}
    assert cache.purge(digest) == {"purged": [], "kept": {digest: "not cached"}}


def test_stats_and_repr(tmp_path):
    cache = make_cache(tmp_path)
    put(cache.blobs, b"data")
    stats = cache.stats()
    assert stats["size"] == 4 and stats["blobs"] == 1 and stats["max_size"] == 1 << 20
    assert stats["fills"] == {} and stats["oversize"] == "passthrough"
    assert stats["hits"] == stats["misses"] == {"blob": 0, "manifest": 0}
    assert "1 blobs, 4 of 1048576 bytes, 0 fills; stats()" in repr(cache)
    cache.stopService()


def test_one_process_per_cache_directory(tmp_path):
    first = make_cache(tmp_path)
    config = CacheConfig(directory=str(tmp_path / "cache"))
    second = Cache(config, MemoryReactorClock(), Metrics(), run=run_now, run_index=run_now)
    with pytest.raises(RuntimeError, match="in use by another dockmirror process"):
        second.startService()
    first.stopService()
    second.startService()
    second.stopService()


def test_proofs_for_blobs_never_cached_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(entries, "PROOFS", 100)
    monkeypatch.setattr(entries, "PROOFS_PER_DIGEST", 4)
    store = make_store(tmp_path)
    digests = [sha256(b"%d" % i) for i in range(1000)]
    for digest in digests:
        store.allow("hub/x https://hub", digest, 10)
    for i in range(10):
        store.allow(f"hub/r{i} https://hub", digests[-1], 10)
    assert len(store._proofs) == 100 and store._access == {}
    assert len(store._proofs[digests[-1]]) == 4
    # The most recent are remembered, with their sizes.
    assert store.allowed("hub/r9 https://hub", digests[-1])
    assert store.size_of(digests[-2], "hub/x https://hub") == 10
    assert not store.allowed("hub/x https://hub", digests[0])
    # Once cached, a blob's proofs are kept (and written to the index).
    data = b"%d" % 999
    put(store, data)
    assert store.allowed("hub/r9 https://hub", sha256(data))
    assert sha256(data) not in store._proofs and len(store._access[sha256(data)]) == 4
