"""The ranged fetch of one blob: when it spreads, where the ranges go, new URLs after a 403."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.web.http_headers import Headers

from dockmirror.cache.parts import MIN_RANGE, RangedFill
from dockmirror.metrics import Metrics
from dockmirror.ranged import BUSY_LIMIT, SPREAD_AFTER, RangedFetch, RangeSupport, busy_seconds
from dockmirror.streaming import StreamError

from ._cache_support import UpstreamTransport, make_store, sha256

SIZE = 4 * MIN_RANGE + 12_345
DATA = os.urandom(SIZE)
DIGEST = sha256(DATA)
CDN = "https://cdn.example/blob?signature=1"


class Answer:
    """An upstream answer whose body the test feeds by hand."""

    def __init__(self, code: int, url: str, span: tuple[int, int] | None, auth: str = "") -> None:
        self.code = code
        headers = {"Content-Range": [f"bytes {span[0]}-{span[1] - 1}/{SIZE}"]} if span else {}
        self.headers = Headers(headers)
        self.length = (span[1] - span[0]) if span else 0
        request_headers = Headers({"Authorization": [auth]} if auth else {})
        self.request = SimpleNamespace(absoluteURI=url.encode(), headers=request_headers)
        self.transport = UpstreamTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, start: int, end: int) -> None:
        self.protocol.dataReceived(DATA[start:end])


class Client:
    """The upstream client's ``get``: answers 206 with the range asked for, or what is queued."""

    read_timeout = 30.0

    def __init__(self) -> None:
        self.asked: list[tuple[str, dict[str, str]]] = []
        self.answers: list[Answer] = []
        self.refuse = 0
        #: The registry's answers to new URL requests, given by the test.
        self.pending: list[Deferred[Answer]] = []

    def get(self, url: str, headers: dict[str, str]) -> Deferred[Answer]:
        self.asked.append((url, headers))
        first, _, last = headers["Range"].removeprefix("bytes=").partition("-")
        if self.refuse:
            self.refuse -= 1
            answer = Answer(403, url, None)
        else:
            answer = Answer(206, url, (int(first), int(last) + 1))
        self.answers.append(answer)
        return succeed(answer)


class Busy:
    """The reactor thread's busy seconds: a share of the clock's time, set by the test."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.share = 0.0
        self.total = 0.0
        self.seen = 0.0

    def watch(self, clock: MemoryReactorClock) -> None:
        self.clock, self.seen = clock, clock.seconds()

    def __call__(self) -> float:
        now = self.clock.seconds()
        self.total += (now - self.seen) * self.share
        self.seen = now
        return self.total


def started(tmp_path, busy=None):
    clock = MemoryReactorClock()
    busy = busy or Busy()
    busy.watch(clock)
    store = make_store(tmp_path, clock=clock)
    fill = store.begin_fill(DIGEST, SIZE, "up", 4)
    assert isinstance(fill, RangedFill)
    client = Client()
    resolved: list[dict[str, str]] = []

    def resolve(headers: dict[str, str]) -> Deferred[Answer]:
        """The registry's answer comes when the test gives it."""
        resolved.append(headers)
        d: Deferred[Answer] = Deferred()
        client.pending.append(d)
        return d

    support = RangeSupport(clock)
    fetch = RangedFetch(fill, client, resolve, support, Metrics(), clock, busy)  # type: ignore[arg-type]
    assert fetch.first_headers() == {"Range": f"bytes=0-{SIZE - 1}"}
    first = Answer(206, CDN, (0, SIZE), auth="")
    done = Deferred.fromCoroutine(fetch.run(first))
    return clock, fill, client, resolved, first, done


def test_a_fast_first_connection_is_left_alone(tmp_path):
    clock, fill, client, _, first, done = started(tmp_path)
    first.send(0, SIZE // 2)
    clock.advance(SPREAD_AFTER)  # half of it in a second: one more second will do
    assert client.asked == []
    first.send(SIZE // 2, SIZE)
    clock.advance(0)
    assert fill.committed and done.called and client.asked == []
    assert not first.transport.stopped  # read to its end, never cut


def test_a_slow_first_connection_spreads_to_where_the_blob_is(tmp_path):
    clock, fill, client, resolved, first, done = started(tmp_path)
    first.send(0, 1000)
    clock.advance(SPREAD_AFTER)
    # Three more connections, each on the next range, at the first answer's URL.
    assert [h["Range"] for _, h in client.asked] == [
        f"bytes={start}-{end - 1}" for start, end in fill.plan[1:4]
    ]
    assert {url for url, _ in client.asked} == {CDN}
    assert all("Authorization" not in h for _, h in client.asked)
    # The first connection reads on to the end of its range, then takes the last one.
    first.send(1000, fill.plan[0][1] + 10)
    assert first.transport.stopped
    last = fill.plan[-1]
    assert client.asked[-1][1]["Range"] == f"bytes={last[0]}-{last[1] - 1}"
    for answer in client.answers:
        start, end = answer.protocol.start, answer.protocol.end
        answer.send(start, end)
    clock.advance(0)
    assert fill.committed and done.called and resolved == []


def test_a_slow_connection_of_a_busy_process_is_not_spread_until_it_is_not_busy(tmp_path):
    busy = Busy()
    clock, fill, client, _, first, _ = started(tmp_path, busy)
    busy.share = BUSY_LIMIT  # the reactor thread has work all the time: it is what is slow
    first.send(0, 1000)
    clock.advance(SPREAD_AFTER)
    clock.advance(SPREAD_AFTER)
    assert client.asked == []
    busy.share = 0.2  # now the link is what is slow
    clock.advance(SPREAD_AFTER)
    assert len(client.asked) == 3
    fill.abandon(StreamError("done"))


def test_busy_seconds_count_the_time_a_thread_works():
    before = busy_seconds()
    end = time.monotonic() + 0.05
    while time.monotonic() < end:
        pass
    assert busy_seconds() - before >= 0.04


def test_ranges_refused_by_the_cdn_get_one_new_url_for_all(tmp_path):
    clock, fill, client, resolved, first, done = started(tmp_path)
    client.refuse = 2
    first.send(0, 1000)
    clock.advance(SPREAD_AFTER)
    # Two refused at once: the registry is asked once, and both go to the new URL.
    assert resolved == [{"Range": "bytes=0-0"}]
    client.pending.pop().callback(Answer(206, CDN.replace("=1", "=2"), (0, 1)))
    assert resolved == [{"Range": "bytes=0-0"}]
    urls = [url for url, _ in client.asked]
    assert urls == [CDN] * 3 + [CDN.replace("=1", "=2")] * 2
    assert {h["Range"] for _, h in client.asked[3:]} == {h["Range"] for _, h in client.asked[:2]}
    first.send(1000, fill.plan[0][1])
    for answer in client.answers:
        if answer.code == 206:
            answer.send(answer.protocol.start, answer.protocol.end)
    clock.advance(0)
    assert fill.committed and done.called
