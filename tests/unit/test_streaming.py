"""BodyStream: flow control both ways, and no complete body of wrong bytes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed

from dockmirror.streaming import BodyStream, DigestMismatch, StreamError

DATA = b"x" * 1000 + b"y" * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class FakeResponse:
    def __init__(self) -> None:
        self.upstream = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.upstream)


@dataclass
class Harness:
    stream: BodyStream
    response: FakeResponse
    client: StringTransport
    clock: MemoryReactorClock
    results: list[Any] = field(default_factory=list)

    @property
    def outcome(self) -> Any:
        """What ``done`` fired with so far (None: not yet)."""
        return self.results[0] if self.results else None

    def feed(self, *chunks: bytes, end: Failure | None = None) -> None:
        for chunk in chunks:
            self.response.protocol.dataReceived(chunk)
        if end is not None:
            self.response.protocol.connectionLost(end)


def start(**kwargs: Any) -> Harness:
    response = FakeResponse()
    clock = MemoryReactorClock()
    stream = BodyStream(response, clock, **kwargs)  # type: ignore[arg-type]
    h = Harness(stream, response, StringTransport(), clock)
    stream.write_to(h.client)
    stream.done.addBoth(h.results.append)
    return h


DONE = Failure(ResponseDone())


def test_verified_body_is_delivered_whole() -> None:
    h = start(length=len(DATA), digest=DIGEST)
    h.feed(DATA[:1000], DATA[1000:])
    # The last chunk waits for the digest check.
    assert h.client.value() == DATA[:1000]
    h.feed(end=DONE)
    assert h.client.value() == DATA
    assert h.outcome == len(DATA)
    assert h.client.producer is None


def test_wrong_bytes_never_arrive_complete() -> None:
    h = start(length=len(DATA), digest=DIGEST)
    h.feed(DATA[:1000], b"z" * 1000, end=DONE)
    assert len(h.client.value()) < len(DATA)
    assert h.outcome.check(DigestMismatch)


def test_bytes_beyond_the_declared_length_abort_the_upstream() -> None:
    h = start(length=10)
    h.feed(b"a" * 11)
    assert h.response.upstream.producerState == "stopped"
    assert h.outcome.check(StreamError)
    assert h.client.value() == b""


def test_short_body_fails() -> None:
    h = start(length=100)
    h.feed(b"a" * 50, end=Failure(ResponseFailed([Failure(Exception("reset"))])))
    assert h.outcome.check(StreamError)


def test_slow_client_pauses_upstream_and_idle_timer() -> None:
    h = start(idle_timeout=60)
    h.stream.pauseProducing()
    assert h.response.upstream.producerState == "paused"
    h.clock.advance(120)  # a paused stream is not idle
    assert h.outcome is None
    h.stream.resumeProducing()
    assert h.response.upstream.producerState == "producing"
    h.clock.advance(61)
    assert h.outcome.check(StreamError)
    assert h.response.upstream.producerState == "stopped"


def test_cancel_aborts_upstream() -> None:
    h = start()
    h.stream.done.cancel()
    assert h.response.upstream.producerState == "stopped"
    assert h.outcome.check(CancelledError)


@pytest.mark.parametrize("chunks", [[DATA], [DATA[:1], DATA[1:]]])
def test_chunking_does_not_matter(chunks: list[bytes]) -> None:
    h = start(digest=DIGEST)
    h.feed(*chunks, end=DONE)
    assert h.client.value() == DATA
