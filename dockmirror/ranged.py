"""Parallel ranged fetch of one large blob into its :class:`~dockmirror.cache.parts.RangedFill`.

The blob is cut in ranges, fetched in order over a few connections at once:
each connection asks for the next range left when it is done with one.
The first connection asks the registry for the whole blob, with a
``Range`` header, as any blob GET is asked (through the upstream's
endpoints, authentication and redirects), and reads range after range of
its answer while no other connection takes the next.  Every
:data:`SPREAD_AFTER` seconds the fill looks at its pace: when the rest would
take longer than :data:`SPREAD_WORTH` seconds more, the other connections
start, each on the next range left.  A link fast enough for one stream
keeps one stream, and its readers lose nothing to waiting for ranges.  So
does a fill slowed by its own process: while the reactor thread was busy
(:data:`BUSY_LIMIT`) during the last look, the link is not what is slow,
and more connections would only cost that thread more work.

The first answer's final URL (a CDN's, after the registry's redirect) is
where the other ranges go, each with the headers its request
carried: a CDN URL on another origin gets no ``Authorization``, since the
redirect dropped it.  When that URL refuses a part (401, 403: signed CDN
URLs expire), the registry is asked for the blob's URL again, at most
:data:`RESOLVES` times per fill.  A part that fails is asked again from
where it stopped, at most :data:`PART_RETRIES` times; one that keeps
failing fails the fill, and nothing is cached.

An upstream that ignores ``Range`` (a 200 with the whole body, or a 206
whose ``Content-Range`` is not the one asked for) is read in one stream
instead: the parts stop, what they delivered stays, and the stream fills
the rest.  That upstream's blobs are then fetched in one stream for
:data:`RANGES_RECHECK` seconds (:class:`RangeSupport`).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from dockmirror.cache.parts import PartBody, RangedFill
from dockmirror.errors import RegistryError
from dockmirror.metrics import Metrics
from dockmirror.shared import Event
from dockmirror.streaming import StreamError
from dockmirror.upstream import UpstreamClient, UpstreamError, discard

log = Logger()

#: Times a failed part is asked again, each from where it stopped.
PART_RETRIES = 3
#: Seconds before the first retry of a part; the next ones wait longer.
RETRY_DELAY = 0.5
#: Times a fill asks the registry again for the blob's URL, after a part was refused there.
RESOLVES = 3
#: Seconds an upstream that ignored ``Range`` has its blobs fetched in one stream.
RANGES_RECHECK = 3600.0
#: Seconds between looks at the first connection's pace, to decide whether to spread ...
SPREAD_AFTER = 1.0
#: ... over more connections: when the rest would take it longer than this many seconds,
SPREAD_WORTH = 2.0
#: and the reactor thread ran, or waited to run, less than this share of the time meanwhile.
BUSY_LIMIT = 0.8

_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})")

#: Asks the registry for the blob with these headers (through its endpoints and redirects).
Resolver = Callable[[dict[str, str]], Awaitable[IResponse]]


def content_range(response: IResponse) -> tuple[int, int, int] | None:
    """A 206's ``Content-Range`` as ``(start, end, total)``, *end* exclusive; None if unusable."""
    values = response.headers.getRawHeaders("content-range") or []
    if len(values) != 1:
        return None
    m = _CONTENT_RANGE.fullmatch(values[0].strip())
    if m is None:
        return None
    first, last, total = (int(g) for g in m.groups())
    if first > last or last >= total:
        return None
    return first, last + 1, total


def busy_seconds() -> float:
    """Seconds the calling thread has run or waited for a CPU to run on.

    Linux's scheduler statistics count both: a thread that always has work
    is busy all the time, even on a machine so loaded that it seldom runs.
    Elsewhere, the thread's CPU time.
    """
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            running, waiting = f.read().split()[:2]
        return (int(running) + int(waiting)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


def range_header(start: int, end: int | None = None) -> str:
    """``bytes=start-`` or, with an exclusive *end*, ``bytes=start-last``."""
    return f"bytes={start}-" + ("" if end is None else str(end - 1))


class RangeSupport:
    """The upstreams seen to ignore ``Range``: their blobs are fetched in one stream for a while."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: Upstream name (from the configuration) -> when to try ranges again.
        self._refused: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<RangeSupport refused by {sorted(self._refused)}>"

    def splits(self, upstream: str) -> bool:
        until = self._refused.get(upstream)
        if until is not None and until <= self._clock.seconds():
            del self._refused[upstream]
            until = None
        return until is None

    def refused(self, upstream: str) -> None:
        self._refused[upstream] = self._clock.seconds() + RANGES_RECHECK


@dataclass
class _Location:
    """Where the blob's bytes are, and the headers the request that got there carried."""

    url: str
    headers: dict[str, str]

    @classmethod
    def of(cls, response: IResponse) -> _Location:
        request = response.request
        authorization = request.headers.getRawHeaders("authorization")
        headers = {"Authorization": authorization[0]} if authorization else {}
        return cls(request.absoluteURI.decode("ascii"), headers)


@dataclass
class _Part:
    pos: int
    end: int
    failures: int = 0


@dataclass
class _Answer:
    """A response checked to be bytes ``[offset, offset + length)`` of the blob."""

    response: IResponse
    offset: int
    length: int | None


class _Unusable(Exception):
    """An answer to a part that is not the bytes asked for: the part failed."""


class _NoRanges(Exception):
    """The upstream ignores ``Range``; *response* is its whole body, if it sent it."""

    def __init__(self, reason: str, response: IResponse | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


class _Connections:
    """The connections of one fill: :attr:`done` fires once none is left.

    The first to fail cancels the others (and the :attr:`spreader` that
    would start more); its failure is :attr:`failure`.
    """

    def __init__(self) -> None:
        self.done: Event[None] = Event()
        self.failure: Failure | None = None
        self.spreader: Deferred[None] | None = None
        self._tasks: list[Deferred[None]] = []

    def start(self, connection: Coroutine[Any, Any, None]) -> None:
        task = Deferred.fromCoroutine(connection)
        self._tasks.append(task)
        task.addBoth(self._ended, task)

    def _ended(self, result: object, task: Deferred[None]) -> None:
        self._tasks.remove(task)
        if isinstance(result, Failure) and self.failure is None:
            if not result.check(CancelledError):
                self.failure = result
            for other in list(self._tasks):
                other.cancel()
        if not self._tasks:
            if self.spreader is not None:
                self.spreader.cancel()
                self.spreader.addErrback(lambda f: f.trap(CancelledError))
            self.done.fire(None)


class RangedFetch:
    """Fetches the parts of *fill*: the first from the registry, the rest from where it led."""

    def __init__(
        self,
        fill: RangedFill,
        client: UpstreamClient,
        resolve: Resolver,
        support: RangeSupport,
        metrics: Metrics,
        reactor: IReactorTime,
        busy: Callable[[], float] = busy_seconds,
    ) -> None:
        self._fill = fill
        #: The reactor thread's busy seconds so far (:func:`busy_seconds`).
        self._busy = busy
        self._client = client
        self._resolve = resolve
        self._support = support
        self._metrics = metrics
        self._reactor = reactor
        self._location: _Location | None = None
        self._generation = 0
        self._resolving: Event[None] | None = None
        self._resolves = 0
        self._retries = 0
        self._fallback: str | None = None
        #: Connections the fill went on with, once it spread (1 until then).
        self._connections = 1

    def __repr__(self) -> str:
        return f"<RangedFetch {self._fill!r} over {self._fill.parts} connections>"

    def first_headers(self) -> dict[str, str]:
        """The headers of the registry request for the first connection: the whole blob."""
        return {"Range": range_header(0, self._fill.size)}

    def _count(self, outcome: str) -> None:
        self._metrics.ranged_parts.labels(self._fill.upstream, outcome).inc()

    async def run(self, first: IResponse) -> None:
        """Fill the blob, *first* being the registry's answer (200 or 206) to the first part."""
        fill = self._fill
        started = self._reactor.seconds()
        if not await fill.open(self._client.read_timeout):
            discard(first)
            return
        try:
            await self._fetch(first)
        except (StreamError, UpstreamError, RegistryError) as e:
            fill.abandon(e if isinstance(e, StreamError) else StreamError(str(e)))
        try:
            await fill.finished.wait()
        except (StreamError, RegistryError):  # the fill logged why
            return
        log.info(
            "fetched {digest} ({size} bytes) from {upstream} over {connections},"
            " in {ranges} ranges, in {seconds:.2f}s: {retries} retries, {resolves} new URLs"
            "{fallback}",
            digest=fill.digest,
            size=fill.size,
            upstream=fill.upstream,
            connections=f"{self._connections} connection{'s' * (self._connections > 1)}",
            ranges=len(fill.plan),
            seconds=self._reactor.seconds() - started,
            retries=self._retries,
            resolves=self._resolves,
            fallback=f", then one stream ({self._fallback})" if self._fallback else "",
        )

    async def _fetch(self, first: IResponse) -> None:
        fill = self._fill
        ranges = deque(_Part(start, end) for start, end in fill.plan)
        part = ranges.popleft()
        try:
            answer = self._check(part, first, fill.size)
        except _NoRanges as e:
            await self._fall_back(e)
            return
        self._location = _Location.of(first)
        connections = _Connections()
        connections.start(self._connection(ranges, part, answer))
        connections.spreader = Deferred.fromCoroutine(self._spread(ranges, connections))
        await connections.done.wait()
        failure = connections.failure
        if failure is None:
            return
        if isinstance(failure.value, _NoRanges):
            await self._fall_back(failure.value)
            return
        failure.raiseException()

    async def _spread(self, ranges: deque[_Part], connections: _Connections) -> None:
        """Start the other connections once the first one proves too slow alone."""
        fill = self._fill
        started = looked = self._reactor.seconds()
        busy = self._busy()
        while ranges and not fill.done:
            await deferLater(self._reactor, SPREAD_AFTER)
            now, was_busy, busy = self._reactor.seconds(), busy, self._busy()
            load, looked = (busy - was_busy) / max(now - looked, 1e-3), now
            if load >= BUSY_LIMIT:
                continue  # this process is what is slow
            elapsed, delivered = now - started, fill.delivered
            if (fill.size - delivered) * elapsed > SPREAD_WORTH * max(delivered, 1):
                more = min(fill.parts - 1, len(ranges))
                self._connections += more
                log.info(
                    "{digest} from {upstream} goes on over {more} more connections",
                    digest=fill.digest,
                    upstream=fill.upstream,
                    more=more,
                )
                for _ in range(more):
                    connections.start(self._connection(ranges))
                return

    async def _connection(
        self, ranges: deque[_Part], part: _Part | None = None, answer: _Answer | None = None
    ) -> None:
        """Fetch *part*, then the next range left, until none is.

        The answer to the first part goes on with the next ranges, while
        they are left.
        """
        if part is not None:

            def extend(end: int) -> int | None:
                if not ranges or ranges[0].pos != end:
                    return None
                self._count("fetched")
                part.end = ranges.popleft().end
                return part.end

            await self._part(part, answer, extend)
        while ranges:
            await self._part(ranges.popleft())

    async def _fall_back(self, why: _NoRanges) -> None:
        """Go on in one stream, from the first byte the parts did not deliver."""
        fill = self._fill
        self._fallback = why.reason
        self._support.refused(fill.upstream)
        self._count("fallback")
        part = _Part(fill.delivered, fill.size)
        log.warn(
            "upstream {upstream} ignores Range ({reason}): {digest} goes on in one stream"
            " from byte {pos}",
            upstream=fill.upstream,
            reason=why.reason,
            digest=fill.digest,
            pos=part.pos,
        )
        answer = self._check(part, why.response) if why.response is not None else None
        await self._part(part, answer)

    async def _part(
        self,
        part: _Part,
        answer: _Answer | None = None,
        extend: Callable[[int], int | None] | None = None,
    ) -> None:
        """Fetch ``[part.pos, part.end)``, asking again from where it stopped after a failure."""
        fill = self._fill
        while part.pos < part.end:
            if fill.error is not None:
                raise StreamError(str(fill.error))
            try:
                if answer is None:
                    answer = self._check(part, await self._ask(part))
                body = PartBody(
                    fill,
                    answer.offset,
                    part.pos,
                    part.end,
                    answer.length,
                    self._reactor,
                    self._client.read_timeout,
                    extend,
                )
                answer.response.deliverBody(body)
                answer = None
                try:
                    await body.done
                finally:
                    part.pos = max(part.pos, min(body.pos, part.end))
            except (StreamError, UpstreamError, RegistryError, _Unusable) as e:
                if fill.error is not None:
                    raise StreamError(str(fill.error)) from None
                part.failures += 1
                if part.failures > PART_RETRIES:
                    raise StreamError(
                        f"bytes {part.pos}-{part.end - 1} failed {part.failures} times,"
                        f" the last: {e}"
                    ) from None
                self._retries += 1
                self._count("retried")
                log.info(
                    "part of {digest} failed at byte {pos} ({error}): asking again",
                    digest=fill.digest,
                    pos=part.pos,
                    error=str(e),
                )
                await deferLater(self._reactor, RETRY_DELAY * part.failures)
        if self._fallback is None:
            self._count("fetched")

    async def _ask(self, part: _Part) -> IResponse:
        """Ask for the rest of *part*: where the blob is, or the registry once in one stream."""
        if self._fallback is not None:
            return await self._resolve({"Range": range_header(part.pos)} if part.pos else {})
        while True:
            location, generation = self._location, self._generation
            assert location is not None
            headers = {**location.headers, "Range": range_header(part.pos, part.end)}
            response = await self._client.get(location.url, headers)
            if response.code not in (401, 403):
                return response
            discard(response)
            await self._resolve_again(generation, response.code)

    async def _resolve_again(self, generation: int, code: int) -> None:
        """Ask the registry where the blob is now, once for all the parts refused meanwhile."""
        if generation != self._generation:
            return  # another part did
        if self._resolving is not None:
            await self._resolving.wait()
            return
        if self._resolves == RESOLVES:
            raise _Unusable(f"the blob's URL answered {code}, after {RESOLVES} new ones")
        self._resolves += 1
        self._count("resolved")
        resolving = self._resolving = Event()
        try:
            response = await self._resolve({"Range": "bytes=0-0"})
            discard(response)
            if response.code not in (200, 206):
                raise _Unusable(f"asked again for the blob, the registry answered {response.code}")
            self._location = _Location.of(response)
            self._generation += 1
        finally:
            self._resolving = None
            resolving.fire(None)

    def _check(self, part: _Part, response: IResponse, end: int | None = None) -> _Answer:
        """The answer *response* is to *part* (asked up to *end*, or its end).

        Raises :class:`_NoRanges` or :class:`_Unusable`.
        """
        size = self._fill.size
        end = part.end if end is None else end
        length = None if response.length == UNKNOWN_LENGTH else int(response.length)
        if response.code == 200:
            if length is not None and length != size:
                discard(response)
                raise _Unusable(f"{length} bytes for {self._fill.digest}, {size} expected")
            if self._fallback is None:
                raise _NoRanges("a 200 with the whole body", response)
            return _Answer(response, 0, length)
        if response.code == 206:
            span = content_range(response)
            if span != (part.pos, end, size):
                discard(response)
                if self._fallback is None:
                    raise _NoRanges("a Content-Range other than the one asked for", None)
                raise _Unusable(f"a Content-Range other than bytes {part.pos}-{end - 1}")
            if length is not None and length != end - part.pos:
                discard(response)
                raise _Unusable(f"{length} bytes for bytes {part.pos}-{end - 1}")
            return _Answer(response, part.pos, length)
        discard(response)
        raise _Unusable(f"answered {response.code}")
