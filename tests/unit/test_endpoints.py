"""Fallback endpoints and their circuit breakers, against scripted endpoints."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from dockmirror.endpoints import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    PROBE_WINDOW,
    Breaker,
    Endpoint,
    EndpointSet,
    by_digest,
    host_port,
)
from dockmirror.metrics import Metrics
from dockmirror.upstream import UpstreamError

DIGEST = "sha256:" + "a" * 64


class Response:
    def __init__(self, code: int) -> None:
        self.code = code
        self.discarded = False

    def deliverBody(self, protocol: Any) -> None:
        self.discarded = True


class Scripted:
    """An endpoint's client: answers with a status, or fails (None)."""

    def __init__(self, base_url: str, answer: int | None = 200) -> None:
        self.base_url = base_url
        self.answer = answer
        self.asked: list[str] = []
        self.pending: Deferred[Any] | None = None

    async def request(self, method: str, repository: str, path: str, *args: Any) -> Any:
        self.asked.append(path)
        if self.pending is not None:
            return await self.pending
        if self.answer is None:
            raise UpstreamError(f"{self.base_url} refused the connection")
        return Response(self.answer)


def make(*specs: tuple[str, int | None, bool]) -> tuple[EndpointSet, list[Scripted], Any]:
    clock = MemoryReactorClock()
    metrics = Metrics()
    clients = [Scripted(url, answer) for url, answer, _ in specs]
    endpoints = [
        Endpoint(c, primary=i == 0, trust_tags=trust, breaker=Breaker(clock))  # type: ignore[arg-type]
        for i, (c, (_, _, trust)) in enumerate(zip(clients, specs, strict=True))
    ]
    return EndpointSet("hub", endpoints, clock, metrics), clients, (clock, metrics)


def run(endpoints: EndpointSet, path: str) -> Any:
    results: list[Any] = []
    Deferred.fromCoroutine(endpoints.request("GET", "library/x", path)).addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def state(metrics: Metrics, endpoint: str) -> float:
    value = metrics.registry.get_sample_value(
        "dockmirror_upstream_endpoint_state", {"upstream": "hub", "endpoint": endpoint}
    )
    assert value is not None
    return value


PRIMARY = ("https://primary.test", None, True)
MIRROR = ("https://mirror.test:5000", 200, False)


@pytest.mark.parametrize("failure", [None, 500, 503, 429])
def test_a_failed_primary_falls_back_to_the_mirror_for_digests(failure: int | None) -> None:
    endpoints, (primary, mirror), (_, metrics) = make(
        ("https://primary.test", failure, True), MIRROR
    )
    assert run(endpoints, f"blobs/{DIGEST}").code == 200
    assert (primary.asked, mirror.asked) == ([f"blobs/{DIGEST}"], [f"blobs/{DIGEST}"])
    assert state(metrics, "primary.test:443") == 2
    assert state(metrics, "mirror.test:5000") == 0


def test_refusals_and_404_do_not_fall_back() -> None:
    endpoints, (primary, mirror), _ = make(("https://primary.test", 404, True), MIRROR)
    assert run(endpoints, f"blobs/{DIGEST}").code == 404
    assert mirror.asked == []


def test_tags_come_only_from_trusted_endpoints() -> None:
    endpoints, (primary, mirror), _ = make(PRIMARY, MIRROR)
    with pytest.raises(UpstreamError, match="primary.test refused"):
        run(endpoints, "manifests/latest")
    with pytest.raises(UpstreamError):
        run(endpoints, "tags/list")
    assert mirror.asked == []
    trusted, (_, trusted_mirror), _ = make(PRIMARY, ("https://mirror.test:5000", 200, True))
    assert run(trusted, "manifests/latest").code == 200
    assert trusted_mirror.asked == ["manifests/latest"]


def test_the_last_failure_is_the_answer_when_every_endpoint_fails() -> None:
    endpoints, (primary, mirror), _ = make(
        ("https://primary.test", 503, True), (MIRROR[0], 429, True)
    )
    response = run(endpoints, "manifests/latest")
    assert response.code == 429
    endpoints, _, _ = make(PRIMARY, (MIRROR[0], None, True))
    with pytest.raises(UpstreamError) as info:
        run(endpoints, "manifests/latest")
    assert "primary.test:443: " in str(info.value) and "mirror.test:5000: " in str(info.value)


def test_an_open_breaker_is_skipped_then_probed_once_with_growing_backoff() -> None:
    endpoints, (primary, mirror), (clock, metrics) = make(PRIMARY, MIRROR)
    run(endpoints, f"blobs/{DIGEST}")
    run(endpoints, f"blobs/{DIGEST}")
    assert len(primary.asked) == 1 and len(mirror.asked) == 2
    clock.advance(BACKOFF_FIRST)
    run(endpoints, f"blobs/{DIGEST}")  # the probe fails: twice as long now
    assert len(primary.asked) == 2
    clock.advance(BACKOFF_FIRST)
    run(endpoints, f"blobs/{DIGEST}")
    assert len(primary.asked) == 2
    clock.advance(BACKOFF_FIRST)
    primary.answer = 200
    primary.pending = Deferred()
    results: list[Any] = []
    Deferred.fromCoroutine(endpoints.request("GET", "r", f"blobs/{DIGEST}")).addBoth(results.append)
    assert state(metrics, "primary.test:443") == 1  # half-open: one probe in flight
    run(endpoints, f"blobs/{DIGEST}")  # meanwhile, others use the mirror
    assert len(primary.asked) == 3
    primary.pending.callback(Response(200))
    assert results[0].code == 200
    assert state(metrics, "primary.test:443") == 0
    assert "primary.test:443 closed" in repr(endpoints)


def test_backoff_is_capped() -> None:
    breaker = Breaker(MemoryReactorClock())
    for _ in range(40):
        backoff = breaker.failed()
    assert backoff == BACKOFF_MAX


def test_a_cancelled_probe_leaves_the_breaker_probeable() -> None:
    endpoints, (primary, _), (clock, _) = make(PRIMARY, MIRROR)
    run(endpoints, f"blobs/{DIGEST}")
    clock.advance(BACKOFF_FIRST)
    primary.pending = Deferred()
    d = Deferred.fromCoroutine(endpoints.request("GET", "r", f"blobs/{DIGEST}"))
    d.addErrback(lambda _: None)
    d.cancel()
    assert endpoints.endpoints[0].breaker.available()


def test_every_endpoint_open_tries_them_all_the_same() -> None:
    endpoints, (primary, mirror), _ = make(PRIMARY, (MIRROR[0], None, False))
    with pytest.raises(UpstreamError):
        run(endpoints, f"blobs/{DIGEST}")
    primary.answer = 200
    assert run(endpoints, f"blobs/{DIGEST}").code == 200
    assert "closed" in endpoints.status()["primary.test:443"]["state"]
    assert endpoints.status()["mirror.test:5000"]["state"] == "open"
    endpoints.reset()
    assert endpoints.status()["mirror.test:5000"]["state"] == "closed"


def test_a_failed_answer_replaced_by_a_better_one_is_discarded() -> None:
    failing = Response(503)

    class Once(Scripted):
        async def request(self, *args: Any) -> Any:
            self.asked.append(args[2])
            return failing

    endpoints, (_, mirror), _ = make(PRIMARY, MIRROR)
    endpoints.endpoints[0].client = Once("https://primary.test")  # type: ignore[assignment]
    assert run(endpoints, f"blobs/{DIGEST}").code == 200
    assert failing.discarded


def test_helpers() -> None:
    assert host_port("https://r.test") == "r.test:443"
    assert host_port("http://[::1]:5000/x") == "[::1]:5000"
    assert by_digest(f"manifests/{DIGEST}") and by_digest(f"blobs/{DIGEST}")
    assert not by_digest("manifests/latest") and not by_digest("tags/list")
    assert not by_digest(f"referrers/{DIGEST}")


def test_a_cancelled_request_discards_the_failed_answer_it_held() -> None:
    failing = Response(503)

    class Failing(Scripted):
        async def request(self, *args: Any) -> Any:
            return failing

    endpoints, (_, mirror), _ = make(PRIMARY, MIRROR)
    endpoints.endpoints[0].client = Failing("https://primary.test")  # type: ignore[assignment]
    mirror.pending = Deferred()
    d = Deferred.fromCoroutine(endpoints.request("GET", "r", f"blobs/{DIGEST}"))
    d.addErrback(lambda _: None)
    assert not failing.discarded
    d.cancel()
    assert failing.discarded


class Wire:
    """The notifiers of two workers, joined: what one publishes, the other hears."""

    def __init__(self) -> None:
        self.listeners: dict[str, list[Any]] = {}
        self.published: list[list[str]] = []
        self.peer: Wire | None = None

    def publish(self, topic: str, message: list[str]) -> None:
        self.published.append(message)
        assert self.peer is not None
        for listener in self.peer.listeners.get(topic, []):
            listener(message)

    def subscribe(self, topic: str, listener: Any) -> None:
        self.listeners.setdefault(topic, []).append(listener)


def two_workers() -> tuple[tuple[EndpointSet, list[Scripted], Any], ...]:
    specs = (("http://primary", 503, True), ("http://backup", 200, False))
    first, second = make(*specs), make(*specs)
    wires = Wire(), Wire()
    wires[0].peer, wires[1].peer = wires[1], wires[0]
    first[0].share(wires[0])  # type: ignore[arg-type]
    second[0].share(wires[1])  # type: ignore[arg-type]
    return first, second


def test_an_endpoint_down_in_one_worker_is_skipped_by_the_others():
    (first, first_clients, _), (second, second_clients, (clock, metrics)) = two_workers()
    assert run(first, f"blobs/{DIGEST}").code == 200
    assert first_clients[0].asked == [f"blobs/{DIGEST}"]
    # The other worker skips the primary without asking it, for the same backoff.
    assert run(second, f"blobs/{DIGEST}").code == 200
    assert second_clients[0].asked == [] and second_clients[1].asked == [f"blobs/{DIGEST}"]
    assert state(metrics, "primary:80") == 2
    clock.advance(BACKOFF_FIRST)
    second_clients[0].answer = 200
    assert run(second, f"blobs/{DIGEST}").code == 200  # its probe finds it back ...
    assert second_clients[0].asked == [f"blobs/{DIGEST}"]
    first_clients[0].answer = 200
    assert run(first, f"blobs/{DIGEST}").code == 200  # ... and the first worker believes it
    assert first_clients[0].asked == [f"blobs/{DIGEST}"] * 2


@pytest.mark.parametrize(
    "message",
    [
        ["hub", "primary:80"],
        ["other", "primary:80", "1", "5"],
        ["hub", "elsewhere:80", "1", "5"],
        ["hub", "primary:80", "x", "5"],
        ["hub", "primary:80", "1", "nan"],
        ["hub", "primary:80", "-1", "5"],
        ["hub", "primary:80", "1", str(BACKOFF_MAX * 2)],
    ],
)
def test_bad_news_of_an_endpoint_is_ignored(message):
    (first, _, _), (second, clients, _) = two_workers()
    for listener in second._notifier.listeners["breaker"]:  # type: ignore[union-attr]
        listener(message)
    assert run(second, f"blobs/{DIGEST}").code == 200
    assert clients[0].asked == [f"blobs/{DIGEST}"]  # the primary was still tried


def test_one_worker_probes_an_endpoint_for_all():
    (first, first_clients, (first_clock, _)), (second, second_clients, (clock, _)) = two_workers()
    assert run(first, f"blobs/{DIGEST}").code == 200  # the primary fails: both skip it
    first_clock.advance(BACKOFF_FIRST)
    clock.advance(BACKOFF_FIRST)
    first_clients[0].pending = Deferred()
    probe = Deferred.fromCoroutine(first.request("GET", "library/x", f"blobs/{DIGEST}"))
    assert len(first_clients[0].asked) == 2  # the first worker took the probe ...
    assert run(second, f"blobs/{DIGEST}").code == 200
    assert second_clients[0].asked == []  # ... and the second left it to it
    first_clients[0].pending.callback(Response(503))  # still down
    assert probe.result.code == 200  # from the backup
    clock.advance(BACKOFF_FIRST)  # the first's backoff has doubled: so has the second's
    assert run(second, f"blobs/{DIGEST}").code == 200 and second_clients[0].asked == []


def test_a_probe_by_a_worker_that_never_tells_is_waited_for_a_while():
    (first, first_clients, (first_clock, _)), (second, second_clients, (clock, _)) = two_workers()
    run(first, f"blobs/{DIGEST}")
    first_clock.advance(BACKOFF_FIRST)
    clock.advance(BACKOFF_FIRST)
    first_clients[0].pending = Deferred()  # the first worker dies in its probe
    Deferred.fromCoroutine(first.request("GET", "library/x", f"blobs/{DIGEST}"))
    clock.advance(PROBE_WINDOW - 1)
    assert run(second, f"blobs/{DIGEST}").code == 200 and second_clients[0].asked == []
    clock.advance(1)
    second_clients[0].answer = 200
    assert run(second, f"blobs/{DIGEST}").code == 200
    assert second_clients[0].asked == [f"blobs/{DIGEST}"]  # its own probe
