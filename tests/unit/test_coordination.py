"""Work shared across processes: claims, usage, eviction, flights; following a fill."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from dockmirror import coordination
from dockmirror._interfaces import ICoordinator
from dockmirror.cache import files
from dockmirror.cache.blobs import BlobGone, BlobStore
from dockmirror.cache.fill import Fill
from dockmirror.cache.follow import POLL_INTERVAL, FollowedFill
from dockmirror.coordination import FileLockCoordinator, LocalCoordinator, SharedFlights
from dockmirror.streaming import StreamError

from ._cache_support import Claims, HeldRunner, make_store, sha256

DIGEST = sha256(b"layer")

#: Claims DIGEST in another process, says so, and holds it until its stdin closes.
_HOLDER = """
import sys
from dockmirror.coordination import FileLockCoordinator
coordinator = FileLockCoordinator(sys.argv[1])
print(coordinator.claim(sys.argv[2]), flush=True)
sys.stdin.read()
"""


class OtherProcess:
    def __init__(self, directory: Path, digest: str = DIGEST) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(directory), digest],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.claimed = self.process.stdout.readline().strip() == "True"

    def end(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=10)


@pytest.fixture
def other(tmp_path: Path) -> Iterator[OtherProcess]:
    holder = OtherProcess(tmp_path)
    yield holder
    holder.end()


def test_both_coordinators_provide_the_interface(tmp_path):
    coordinator = FileLockCoordinator(str(tmp_path))
    verifyObject(ICoordinator, coordinator)
    verifyObject(ICoordinator, LocalCoordinator())
    coordinator.close()


def test_a_lone_process_holds_every_claim():
    local = LocalCoordinator()
    assert not local.shared
    assert local.claim(DIGEST) and local.claim(DIGEST) and not local.held_elsewhere(DIGEST)


def test_a_claim_held_by_another_process_is_refused_until_it_dies(tmp_path, other):
    coordinator = FileLockCoordinator(str(tmp_path))
    assert other.claimed
    assert coordinator.held_elsewhere(DIGEST)
    assert not coordinator.claim(DIGEST)
    assert coordinator.claim(sha256(b"another layer"))
    other.process.kill()
    other.process.wait()
    assert not coordinator.held_elsewhere(DIGEST)
    assert coordinator.claim(DIGEST)
    assert not coordinator.held_elsewhere(DIGEST)  # our own claim
    coordinator.close()


def test_a_released_claim_can_be_taken_by_another_process(tmp_path):
    coordinator = FileLockCoordinator(str(tmp_path))
    assert coordinator.claim(DIGEST)
    refused = OtherProcess(tmp_path)
    assert not refused.claimed
    refused.end()
    coordinator.release(DIGEST)
    taken = OtherProcess(tmp_path)
    assert taken.claimed
    taken.end()
    coordinator.close()


def test_the_usage_is_counted_once_for_every_process(tmp_path):
    first, second = FileLockCoordinator(str(tmp_path)), FileLockCoordinator(str(tmp_path))
    first.start_usage(100)
    second.start_usage(70)  # a worker starting later finds it counted
    assert first.add_usage(0) == second.add_usage(0) == 100
    assert first.add_usage(25) == 125 and second.add_usage(-5) == 120
    first.close()
    second.close()
    (tmp_path / "usage").unlink()  # as the supervisor does at start
    again = FileLockCoordinator(str(tmp_path))
    again.start_usage(70)
    assert again.add_usage(0) == 70
    again.close()


def python(script: str, *args: object) -> tuple[subprocess.Popen[str], str]:
    """Run *script* in another process; it, and the first line it says."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


_RESERVER = """
import sys
from dockmirror.coordination import FileLockCoordinator
coordinator = FileLockCoordinator(sys.argv[1])
coordinator.add_usage(int(sys.argv[2]))
print(coordinator.reserve(int(sys.argv[3])), coordinator.promise(5), flush=True)
sys.stdin.read()
"""


def test_the_reservations_of_a_process_that_dies_stop_counting(tmp_path):
    coordinator = FileLockCoordinator(str(tmp_path))
    coordinator.start_usage(100)
    assert coordinator.reserve(10) == 110
    assert coordinator.promise(3) == 3
    other, said = python(_RESERVER, tmp_path, "7", "50")
    assert said == "167 8"  # 107 held, 10 and 50 reserved; 3 and 5 promised
    assert coordinator.add_usage(0) == 167 and coordinator.promise(0) == 8
    other.kill()  # mid-fill: its 50 reserved bytes were never held
    other.wait()
    assert coordinator.add_usage(0) == 117 and coordinator.promise(0) == 3
    assert coordinator.reserve(-10) == 107
    # A process taking the dead one's slot starts from nothing.
    again, said = python(_RESERVER, tmp_path, "0", "1")
    assert said == "108 8"
    again.communicate()
    coordinator.close()


# --- following a fill of another process ----------------------------------------


def follow(tmp_path: Path, claims: Claims, clock: MemoryReactorClock, size: int = 10):
    final = tmp_path / "final"
    temp = tmp_path / "tmp" / f"{DIGEST.partition(':')[2]}.1"
    temp.parent.mkdir(exist_ok=True)
    ended: list[FollowedFill] = []
    fill = FollowedFill(
        DIGEST,
        size,
        str(final),
        lambda: str(temp) if temp.exists() else None,
        claims,
        clock,
        ended.append,
        idle_timeout=30,
    )
    return fill, temp, final, ended


def test_a_followed_fill_reports_growth_then_verification(tmp_path):
    clock, claims = MemoryReactorClock(), Claims()
    claims.elsewhere.add(DIGEST)
    fill, temp, final, ended = follow(tmp_path, claims, clock)
    changes: list[int] = []
    fill.subscribe(lambda: changes.append(fill.written))
    fill.start()
    assert not fill.ready.fired  # no file yet: the filler waits for the upstream
    temp.write_bytes(b"12345")
    clock.advance(POLL_INTERVAL)
    assert fill.ready.fired and fill.temp_path == str(temp)
    assert (fill.written, fill.verified) == (5, False)
    temp.write_bytes(b"1234567890")
    clock.advance(POLL_INTERVAL)
    assert (fill.written, fill.verified) == (10, False)
    os.rename(temp, final)  # verified, made durable and named: then the claim ends
    claims.elsewhere.clear()
    clock.advance(POLL_INTERVAL)
    assert fill.verified and fill.committed and fill.finished.fired
    assert changes == [5, 10, 10] and ended == [fill]
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("file_made", [True, False])
def test_a_followed_fill_fails_when_the_claim_ends_without_the_blob(tmp_path, file_made):
    clock, claims = MemoryReactorClock(), Claims()
    claims.elsewhere.add(DIGEST)
    fill, temp, _, ended = follow(tmp_path, claims, clock)
    fill.start()
    if file_made:
        temp.write_bytes(b"123")
    clock.advance(POLL_INTERVAL)
    claims.elsewhere.clear()  # the filling worker failed, or was killed
    clock.advance(POLL_INTERVAL)
    assert isinstance(fill.error, StreamError) and not fill.verified
    failures: list[object] = []
    fill.finished.wait().addErrback(failures.append)
    assert failures and ended == [fill]


def test_a_followed_fill_that_stops_growing_fails(tmp_path):
    clock, claims = MemoryReactorClock(), Claims()
    claims.elsewhere.add(DIGEST)
    fill, temp, _, _ = follow(tmp_path, claims, clock)
    temp.write_bytes(b"123")
    fill.start()
    clock.pump([POLL_INTERVAL] * int(31 / POLL_INTERVAL))
    assert isinstance(fill.error, StreamError) and "no progress" in str(fill.error)


def test_a_followed_fill_of_the_wrong_size_is_refused(tmp_path):
    clock, claims = MemoryReactorClock(), Claims()
    fill, _, final, _ = follow(tmp_path, claims, clock)
    final.write_bytes(b"123")
    fill.start()
    assert isinstance(fill.error, StreamError) and not fill.verified


# --- the blob store sharing its directory ----------------------------------------


def shared_store(tmp_path: Path):
    store = make_store(tmp_path)
    claims = Claims()
    store.coordinator = claims
    return store, claims


def test_a_blob_another_worker_fills_is_followed_not_fetched(tmp_path):
    store, claims = shared_store(tmp_path)
    claims.elsewhere.add(DIGEST)
    fill = store.begin_fill(DIGEST, 5, "up")
    assert isinstance(fill, FollowedFill)
    assert store.filling(DIGEST) is fill and store.reserved == 0
    fill.abandon(StreamError("stop"))
    assert store.filling(DIGEST) is None


def test_a_fill_of_our_own_claims_and_releases(tmp_path):
    store, claims = shared_store(tmp_path)
    fill = store.begin_fill(DIGEST, 5, "up")
    assert isinstance(fill, Fill) and DIGEST in claims.mine
    fill.abandon(StreamError("stop"))
    assert DIGEST not in claims.mine


def test_blobs_another_worker_committed_or_removed(tmp_path):
    store, _ = shared_store(tmp_path)
    data = b"layer"
    path = Path(store.path(DIGEST))
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert store.has(DIGEST) and store.size_of(DIGEST) == len(data)
    fill = store.begin_fill(DIGEST, len(data), "up")
    assert isinstance(fill, FollowedFill) and fill.committed  # nothing to fetch
    path.unlink()  # purged or evicted by another worker
    assert not store.has(DIGEST) and store.size == 0


def test_another_workers_fill_is_listed_and_survives_a_start(tmp_path):
    store, claims = shared_store(tmp_path)
    hexpart = DIGEST.partition(":")[2]
    temp = tmp_path / "tmp" / f"{hexpart}.abc"
    temp.write_bytes(b"12")
    claims.elsewhere.add(DIGEST)
    assert store.stats()["elsewhere"] == {DIGEST: 2}
    store.recover(store._index.load())
    assert temp.exists()
    claims.elsewhere.clear()
    store.recover(store._index.load())
    assert not temp.exists()


def test_a_new_fill_removes_a_dead_fills_file(tmp_path):
    hexpart = DIGEST.partition(":")[2]
    (tmp_path / f"{hexpart}.dead").write_bytes(b"12")
    (tmp_path / "other.x").write_bytes(b"1")
    os.close(files.create_fill(str(tmp_path / f"{hexpart}.new")))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{hexpart}.new", "other.x"]


def two_workers(tmp_path: Path, max_size: int) -> tuple[BlobStore, BlobStore, Claims, Any]:
    """Two stores on one directory, quota and index, as two workers have them."""
    clock = MemoryReactorClock()
    claims = Claims()
    stores = []
    for _ in range(2):
        store = make_store(tmp_path, max_size=max_size, clock=clock)
        store.coordinator = claims
        stores.append(store)
    return stores[0], stores[1], claims, clock


def put(store: BlobStore, data: bytes) -> str:
    digest = sha256(data)
    assert Deferred.fromCoroutine(store.put_small(digest, data)).result is True
    return digest


def test_a_blob_used_by_another_worker_is_not_the_least_recently_used(tmp_path):
    first, second, _, clock = two_workers(tmp_path, max_size=30)
    old, used_elsewhere = put(first, b"a" * 10), put(first, b"b" * 10)
    clock.advance(10)
    first._index.flush()
    clock.advance(10)
    # Only the second worker reads the first blob now: in the first's own LRU it is the oldest.
    assert second.has(old) and second.read_small(old) == b"a" * 10
    second._index.flush()
    clock.advance(10)
    first._index.flush()
    put(first, b"c" * 10)
    newest = put(first, b"d" * 10)
    assert first.has(old) and not first.has(used_elsewhere) and first.has(newest)
    assert first.coordinator.add_usage(0) == 30


def test_a_worker_evicts_blobs_another_one_cached(tmp_path):
    first, second, _, clock = two_workers(tmp_path, max_size=20)
    theirs = put(first, b"a" * 10)
    clock.advance(10)
    first._index.flush()
    mine = put(second, b"b" * 10)
    newest = put(second, b"c" * 10)  # room made from the first worker's blob
    assert not os.path.exists(second.path(theirs))
    assert second.has(mine) and second.has(newest) and not first.has(theirs)
    assert second.coordinator.add_usage(0) == 20


# --- work done once for every process ---------------------------------------------


class Heard:
    """A notifier whose published messages the test reads, and whose listener it calls."""

    def __init__(self) -> None:
        self.published: list[tuple[str, list[str]]] = []
        self.listeners: list[Any] = []

    def publish(self, topic: str, message: list[str]) -> None:
        self.published.append((topic, message))

    def subscribe(self, topic: str, listener: Any) -> None:
        self.listeners.append(listener)


def flights() -> tuple[SharedFlights, Claims, Heard, MemoryReactorClock, list[list[str]]]:
    clock, claims, notifier = MemoryReactorClock(), Claims(), Heard()
    shared = SharedFlights(clock, "manifest")
    shared.coordinator = claims
    shared.share(notifier)  # type: ignore[arg-type]
    results: list[list[str]] = []
    shared.on_result.append(results.append)
    return shared, claims, notifier, clock, results


def waiting(shared: SharedFlights, key: str) -> list[object]:
    outcome: list[object] = []
    Deferred.fromCoroutine(shared.wait(key)).addBoth(outcome.append)
    return outcome


def test_the_first_process_does_the_work_and_tells_the_others():
    shared, claims, notifier, _, _ = flights()
    assert waiting(shared, "k") == [None]  # ours: the claim is held until done
    assert claims.mine
    shared.done("k", ["digest"])
    assert not claims.mine
    [(topic, [flight, result])] = notifier.published
    assert topic == "manifest" and result == "digest" and flight.startswith("sha256:")


def test_a_process_waits_for_the_result_of_another():
    shared, claims, notifier, clock, results = flights()
    claims.elsewhere.add(coordination._flight("k"))
    outcome = waiting(shared, "k")
    clock.advance(10)
    assert outcome == []
    notifier.listeners[0]([coordination._flight("other"), "x"])
    assert outcome == [] and results == [["x"]]  # heard by every process, waiting or not
    notifier.listeners[0]([coordination._flight("k"), "digest", "type"])
    assert outcome == [["digest", "type"]] and not clock.getDelayedCalls()


def test_a_waiter_does_the_work_when_the_other_gave_up_or_is_too_slow():
    shared, claims, _, clock, _ = flights()
    flight = coordination._flight("k")
    claims.elsewhere.add(flight)
    outcome = waiting(shared, "k")
    clock.advance(1)
    claims.elsewhere.clear()  # it failed, or died, and told nothing
    clock.pump([coordination.FLIGHT_POLL] * 5)
    assert outcome == []  # its result may be on its way
    clock.pump([coordination.FLIGHT_POLL] * int(coordination.FLIGHT_GRACE / 0.05 + 2))
    assert outcome == [None] and flight in claims.mine
    shared.done("k", None)
    claims.elsewhere.add(flight)
    late = waiting(shared, "k")
    clock.pump([1.0] * int(coordination.FLIGHT_WAIT + 1))
    assert late == [None] and flight not in claims.mine  # done without the claim
    assert not clock.getDelayedCalls()


class ClusterLocks:
    """Claims of the cluster's nodes, as PostgreSQL would hold them: *taken* by another node."""

    def __init__(self) -> None:
        self.taken = False
        self.left: list[str] | None = None
        self.mine: set[str] = set()
        self.released: list[tuple[str, list[str] | None]] = []

    def claim(self, flight: str, recent: float) -> Deferred[tuple[bool, list[str] | None]]:
        if self.left is not None:
            return succeed((False, self.left))
        if self.taken:
            return succeed((False, None))
        self.mine.add(flight)
        return succeed((True, None))

    def release(self, flight: str, result: list[str] | None) -> None:
        self.mine.discard(flight)
        self.released.append((flight, result))


def held_by_another_node() -> tuple[SharedFlights, Claims, Heard, MemoryReactorClock, list[object]]:
    """A process waiting for the flight "k" of the cluster, which another node holds."""
    shared, claims, notifier, clock, _ = flights()
    shared.cluster = ClusterLocks()
    shared.cluster.taken = True
    outcome = cluster_waiting(shared, "k")
    clock.pump([coordination.CLUSTER_FLIGHT_POLL] * 4)
    return shared, claims, notifier, clock, outcome


def cluster_waiting(shared: SharedFlights, key: str) -> list[object]:
    outcome: list[object] = []
    Deferred.fromCoroutine(shared.wait(key, cluster=True)).addBoth(outcome.append)
    return outcome


def test_a_cluster_flight_is_done_by_the_holder_of_both_claims_which_leaves_its_result():
    shared, claims, _, clock, _ = flights()
    shared.cluster = locks = ClusterLocks()
    flight = coordination._flight("k")
    outcome = cluster_waiting(shared, "k")
    clock.advance(0)
    assert outcome == [None]
    assert flight in claims.mine and flight in locks.mine
    shared.done("k", ["digest", "type"])
    assert locks.released == [(flight, ["digest", "type"])] and not claims.mine


def test_a_cluster_flight_waits_for_the_node_holding_it():
    shared, claims, notifier, clock, outcome = held_by_another_node()
    flight = coordination._flight("k")
    assert outcome == [] and flight in claims.mine  # this node's others wait for us
    notifier.listeners[0]([flight, "digest", "type"])
    assert outcome == [["digest", "type"]]
    assert isinstance(shared.cluster, ClusterLocks) and not shared.cluster.mine
    assert not claims.mine and not clock.getDelayedCalls()
    # Asked again at once, the result just heard is the answer.
    assert cluster_waiting(shared, "k") == [["digest", "type"]]


def test_a_cluster_flight_takes_the_result_its_last_holder_left():
    shared, claims, _, clock, _ = flights()
    shared.cluster = locks = ClusterLocks()
    locks.left = ["digest", "type"]
    outcome = cluster_waiting(shared, "k")
    clock.advance(0)
    assert outcome == [["digest", "type"]] and not claims.mine and not locks.mine


def test_a_cluster_flight_is_taken_over_when_its_node_lets_go_without_a_result():
    shared, claims, _, clock, outcome = held_by_another_node()
    flight = coordination._flight("k")
    assert isinstance(shared.cluster, ClusterLocks)
    locks = shared.cluster
    locks.taken = False  # that node failed, or died
    clock.advance(coordination.CLUSTER_FLIGHT_POLL)
    assert outcome == [] and flight in locks.mine  # its result may be on its way
    clock.pump([coordination.FLIGHT_GRACE] * 2)
    assert outcome == [None] and flight in locks.mine and flight in claims.mine


_READER = """
import sys
from dockmirror.coordination import FileLockCoordinator
coordinator = FileLockCoordinator(sys.argv[1])
print(coordinator.pin(sys.argv[2]), coordinator.exclude(sys.argv[3]), flush=True)
sys.stdin.read()
"""


def test_a_blob_read_by_another_process_is_pinned_until_it_dies(tmp_path):
    coordinator = FileLockCoordinator(str(tmp_path))
    other, said = python(_READER, tmp_path, DIGEST, sha256(b"x"))
    assert said == "True True"
    assert not coordinator.exclude(DIGEST)  # it reads it
    assert not coordinator.pin(sha256(b"x"))  # it removes it
    assert not coordinator.held_elsewhere(DIGEST)  # reading is not filling
    other.kill()
    other.wait()
    assert coordinator.exclude(DIGEST)
    assert coordinator.pin(sha256(b"x"))
    coordinator.close()


def test_a_blob_being_removed_is_refused_to_readers_until_readmitted(tmp_path):
    coordinator = FileLockCoordinator(str(tmp_path))
    assert coordinator.exclude(DIGEST)
    assert not coordinator.pin(DIGEST)  # not even here: POSIX would merge the locks
    code = "c = FileLockCoordinator(sys.argv[1])\nprint(c.pin(sys.argv[2]), flush=True)\n"
    code += "sys.stdin.read()"
    other, said = python(_IMPORTS + code, tmp_path, DIGEST)
    assert said == "False"
    other.kill()
    other.wait()
    coordinator.readmit(DIGEST)
    other, said = python(_IMPORTS + code, tmp_path, DIGEST)
    assert said == "True"
    assert not coordinator.exclude(DIGEST)
    other.kill()
    other.wait()
    coordinator.close()


def test_reads_are_seen_by_every_process_at_once(tmp_path):
    coordinator = FileLockCoordinator(str(tmp_path))
    assert coordinator.last_read(DIGEST) is None
    code = "FileLockCoordinator(sys.argv[1]).read_at(sys.argv[2], 1234.5); print('', flush=True)"
    other, _ = python(_IMPORTS + code, tmp_path, DIGEST)
    assert coordinator.last_read(DIGEST) == 1234.5
    assert coordinator.last_read(sha256(b"x")) is None
    other.kill()
    other.wait()
    coordinator.close()


_IMPORTS = "import sys\nfrom dockmirror.coordination import FileLockCoordinator\n"


@pytest.mark.parametrize("there", ["filled", "read"])
def test_a_blob_another_worker_fills_or_reads_is_not_evicted(tmp_path, there):
    first, _, claims, clock = two_workers(tmp_path, max_size=20)
    busy = put(first, b"a" * 10)
    clock.advance(10)
    other = put(first, b"b" * 10)
    clock.advance(10)
    first._index.flush()
    # Filled again there (after a purge here), or read there.
    (claims.elsewhere if there == "filled" else claims.read_elsewhere).add(busy)
    put(first, b"c" * 10)
    assert first.has(busy) and not first.has(other)
    assert not first.remove(busy)  # nor purged, as one filled or read here is not


def test_a_blob_read_by_another_worker_lately_is_not_evicted_before_the_index_says_so(tmp_path):
    first, _, claims, clock = two_workers(tmp_path, max_size=20)
    read = put(first, b"a" * 10)
    clock.advance(10)
    other = put(first, b"b" * 10)
    clock.advance(10)
    first._index.flush()  # the index says: read, then other
    claims.reads[read] = clock.seconds()  # read there just now, not in the index yet
    put(first, b"c" * 10)
    assert first.has(read) and not first.has(other)


def test_a_victim_whose_file_is_still_being_removed_is_not_chosen_again(tmp_path):
    first, _, claims, clock = two_workers(tmp_path, max_size=20)
    old = put(first, b"a" * 10)
    clock.advance(10)
    other = put(first, b"b" * 10)
    clock.advance(10)
    first._index.flush()
    disk = first._run = HeldRunner()  # type: ignore[method-assign]
    # The first fill evicts the old blob; its file and its index row go later ...
    assert isinstance(first.begin_fill(sha256(b"c" * 10), 10, "hub"), Fill)
    assert claims.usage == 30  # still counted by every process, as good as free here
    # ... so the index still lists it, first: the second fill must not count it again,
    # nor count its bytes as still held.
    assert isinstance(first.begin_fill(sha256(b"d" * 10), 10, "hub"), Fill)
    assert first.begin_fill(sha256(b"e" * 10), 10, "hub") == "cache full of blobs in use"
    disk.run_all()
    assert not first.has(old) and not first.has(other)
    assert claims.usage == 20  # the two fills' reservations
    assert first.metrics.evictions._value.get() == 2


def test_a_blob_another_worker_removes_is_not_read(tmp_path):
    first, _, claims, _ = two_workers(tmp_path, max_size=20)
    digest = put(first, b"a" * 10)
    claims.removed_elsewhere.add(digest)
    with pytest.raises(BlobGone):
        first.reader(digest, 0, 10, lambda n: None)
    assert first.stats()["readers"] == 0
    claims.removed_elsewhere.clear()
    os.remove(first.path(digest))  # it is gone now
    with pytest.raises(BlobGone):
        first.reader(digest, 0, 10, lambda n: None)
    assert first.stats()["readers"] == 0


def test_the_blobs_one_worker_keeps_are_kept_by_the_others(tmp_path):
    first, second, _, _ = two_workers(tmp_path, max_size=20)
    told: list[bool] = []
    first.on_keep.append(lambda: told.append(True))
    kept, other = put(first, b"a" * 10), put(first, b"b" * 10)
    first.keep([kept])
    assert told == [True]
    with open(tmp_path / "kept", "a") as f:
        f.write("not a digest\nsha256:../../etc/passwd\n")
    second.reload_kept()
    assert second.stats()["kept"] == 1
    second._index.flush()
    put(second, b"c" * 10)  # room is made from the blob not kept
    assert second.has(kept) and not second.has(other)
