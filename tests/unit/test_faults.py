"""Faults at the edges, in memory: silent upstreams, Retry-After, slow clients, health."""

from __future__ import annotations

import json
import os
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from dockmirror.auth.keystore import KeyStore
from dockmirror.cache.eviction import DISK_MARGIN
from dockmirror.config import ConfigError, load
from dockmirror.connections import ConnectionLimits, GuardedChannel
from dockmirror.errors import RETRY_AFTER_DEFAULT, RETRY_AFTER_MAX, retry_after
from dockmirror.health import Degraded, HealthResource, cache_space, key_store
from dockmirror.metrics import Metrics
from dockmirror.upstream import UpstreamTimeout, read_small
from dockmirror.web import MirrorSite

from ._cache_support import make_store


class SlowResponse:
    """A response whose body arrives only as the test says."""

    length = -1

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0] if results else None


def test_a_silent_body_times_out_and_is_aborted() -> None:
    clock = MemoryReactorClock()
    response = SlowResponse()
    d = Deferred.fromCoroutine(read_small(response, reactor=clock, timeout=5))  # type: ignore[arg-type]
    results: list[Any] = []
    d.addBoth(results.append)
    response.protocol.dataReceived(b'{"sch')
    clock.advance(4)
    response.protocol.dataReceived(b'emaVersion"')
    clock.advance(4)
    assert results == []  # each byte restarts the wait
    clock.advance(1.5)
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(UpstreamTimeout)
    assert response.transport.producerState == "stopped"


def test_a_body_cut_short_is_an_error_not_a_short_body() -> None:
    response = SlowResponse()
    d = Deferred.fromCoroutine(read_small(response))  # type: ignore[arg-type]
    response.protocol.dataReceived(b"{")
    response.protocol.connectionLost(Failure(ResponseFailed([Failure(OSError("reset"))])))
    failure = result_of(d)
    assert isinstance(failure, Failure) and "connection failed" in failure.getErrorMessage()


def test_a_large_body_is_refused_and_aborted() -> None:
    response = SlowResponse()
    d = Deferred.fromCoroutine(read_small(response, 4))  # type: ignore[arg-type]
    response.protocol.dataReceived(b"abcdefgh")
    failure = result_of(d)
    assert isinstance(failure, Failure) and "over the 4 bytes" in failure.getErrorMessage()
    assert response.transport.producerState == "stopped"
    response.protocol.connectionLost(Failure(ResponseDone()))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("17", 17),
        ("0", 1),
        ("99999999999999999999", RETRY_AFTER_MAX),
        (None, RETRY_AFTER_DEFAULT),
        ("soon", RETRY_AFTER_DEFAULT),
        ("-5", RETRY_AFTER_DEFAULT),
        ("1e3", RETRY_AFTER_DEFAULT),
        ("Wed, 99 Foo 2024", RETRY_AFTER_DEFAULT),
    ],
)
def test_retry_after_is_validated_and_bounded(value: str | None, expected: int) -> None:
    assert retry_after(value, time.time()) == expected


def test_retry_after_as_a_date() -> None:
    now = time.time()
    assert 115 <= retry_after(formatdate(now + 120, usegmt=True), now) <= 120
    assert retry_after(formatdate(now - 120, usegmt=True), now) == 1


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dockmirror.toml"
    path.write_text(text)
    return str(path)


def test_timeouts_and_limits_are_read_and_checked(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[server]
header_timeout = 5
max_connections = 10
max_connections_per_client = 2
[cache]
min_free = "1GiB"
[upstreams.hub]
plugin = "dockerhub"
connect_timeout = 2.5
read_timeout = 7
""",
        )
    )
    assert (config.server.header_timeout, config.server.idle_timeout) == (5.0, 60.0)
    assert config.server.send_timeout == 60.0
    assert (config.server.max_connections, config.server.max_connections_per_client) == (10, 2)
    assert config.cache.min_free_bytes == 1 << 30
    assert (config.upstreams["hub"].connect_timeout, config.upstreams["hub"].read_timeout) == (
        2.5,
        7.0,
    )
    for bad in (
        "[upstreams.hub]\nplugin = 'dockerhub'\nread_timeout = 0",
        "[upstreams.hub]\nplugin = 'dockerhub'\nconnect_timeout = nan",
        "[upstreams.hub]\nplugin = 'dockerhub'\nread_timeout = 'soon'",
        "[server]\nheader_timeout = -1",
        "[server]\nsend_timeout = 0",
        "[server]\nsend_timeout = inf",
        "[server]\nmax_connections = 0",
        "[cache]\nmin_free = 'lots'",
    ):
        with pytest.raises(ConfigError):
            load(write(tmp_path, bad))


def test_min_free_defaults_to_the_lesser_of_256_MiB_and_5_percent(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    space = store.space()
    assert space is not None
    st = os.statvfs(tmp_path)
    assert space[1] == min(DISK_MARGIN, int(st.f_blocks * st.f_frsize * 0.05))
    store.min_free = 123
    assert store.space()[1] == 123  # type: ignore[index]


class Space:
    def __init__(self, free: int, margin: int) -> None:
        self.free, self.margin = free, margin

    def space(self) -> tuple[int, int]:
        return self.free, self.margin


def health(checks: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = DummyRequest([b""])
    result_of(Deferred.fromCoroutine(HealthResource(checks).serve(request)))
    return request.responseCode or 200, json.loads(b"".join(request.written))


def test_a_full_cache_is_degraded_not_down() -> None:
    space = Space(10, 100)
    code, body = health({"cache_space": cache_space(space)})
    assert code == 200 and body["status"] == "degraded"
    assert "under cache.min_free" in body["checks"]["cache_space"]["degraded"]
    space.free = 1000
    assert health({"cache_space": cache_space(space)}) == (
        200,
        {"status": "ok", "checks": {"cache_space": {"ok": True}}},
    )
    code, body = health({"cache_space": cache_space(space), "other": lambda: "broken"})
    assert code == 503 and body["status"] == "unhealthy"


def test_degraded_is_a_result() -> None:
    assert Degraded("why").reason == "why"


@pytest_twisted.ensureDeferred
async def test_an_unusable_key_store_is_retried_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    path.write_bytes(b"this is not a database" * 10)
    store = KeyStore(path, reactor)
    store.startService()  # does not raise
    try:
        result = await key_store(store)()
        assert isinstance(result, str) and "not a database" in result
        path.unlink()
        await store.flush()
        assert await key_store(store)() is True
        assert await store.list() == []
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_key_store_that_cannot_be_written_is_degraded() -> None:
    class ReadOnly:
        write_error = "attempt to write a readonly database"

        async def check(self) -> bool:
            return True

    result = await key_store(ReadOnly())()  # type: ignore[arg-type]
    assert isinstance(result, Degraded) and "readonly" in result.reason


def channel(limits: ConnectionLimits, clock: MemoryReactorClock, host: str) -> Any:
    site = MirrorSite(Resource(), Metrics(), limits=limits, header_timeout=10)
    site.reactor = clock
    protocol = site.buildProtocol(IPv4Address("TCP", host, 1234))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 1234))
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_request_trickling_in_is_cut_at_the_header_timeout() -> None:
    clock = MemoryReactorClock()
    limits = ConnectionLimits(100, 10)
    protocol, transport = channel(limits, clock, "10.0.0.1")
    assert isinstance(protocol, GuardedChannel)
    for byte in b"GET /v2/ HTTP/1.1\r\nHost: x\r\n":
        protocol.dataReceived(bytes([byte]))
        clock.advance(0.5)
        if transport.disconnecting:
            break
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting
    protocol.connectionLost(Failure(ResponseDone()))
    assert repr(limits).startswith("<ConnectionLimits 0/100")


def test_connections_over_the_limits_are_refused() -> None:
    clock = MemoryReactorClock()
    limits = ConnectionLimits(4, 2)
    held = [channel(limits, clock, "10.0.0.1") for _ in range(2)]
    refused, transport = channel(limits, clock, "10.0.0.1")
    assert not isinstance(refused, GuardedChannel)
    assert transport.value().startswith(b"HTTP/1.1 503 ") and transport.disconnecting
    others = [channel(limits, clock, f"10.0.0.{n}") for n in (2, 3)]
    assert all(isinstance(p, GuardedChannel) for p, _ in others)
    over, transport = channel(limits, clock, "10.0.0.9")
    assert b"max_connections" in transport.value()
    protocol, _ = held[0]
    protocol.connectionLost(Failure(ResponseDone()))
    again, _ = channel(limits, clock, "10.0.0.1")
    assert isinstance(again, GuardedChannel)
    for p, _ in [*held[1:], *others, (again, None)]:
        p.connectionLost(Failure(ResponseDone()))
    clock.advance(100)


def test_each_worker_serves_its_share_of_the_limits() -> None:
    clock = MemoryReactorClock()
    limits = ConnectionLimits(9, 5, workers=2)
    assert (limits.total, limits.per_client) == (4, 2)
    assert ConnectionLimits(1, 1, workers=4).total == 1  # a worker serves at least one
    held = [channel(limits, clock, "10.0.0.1") for _ in range(2)]
    _, transport = channel(limits, clock, "10.0.0.1")
    assert b"this worker's share (1/2) of server.max_connections_per_client" in transport.value()
    for protocol, _ in held:
        protocol.connectionLost(Failure(ResponseDone()))
