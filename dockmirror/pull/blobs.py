"""Blobs: served from the cache, filled once however many clients ask, or passed through.

A missing blob is filled from the shared storage tier, another cluster node
or the upstream, in one stream or in ranges; every reader follows the
growing file.  A blob the cache cannot keep is streamed through uncached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from dockmirror.cache import origin_of
from dockmirror.cache.blobs import BlobGone
from dockmirror.cache.fill import CacheWriteError, Fill
from dockmirror.cache.follow import FollowedFill
from dockmirror.cache.parts import PartBody, RangedFill
from dockmirror.errors import RegistryError, upstream_unavailable
from dockmirror.logs import printable
from dockmirror.pull.access import (
    CACHE_TIER,
    HIT,
    MISS,
    SHARED,
    PullContext,
    Reply,
    UpstreamAccess,
    content_length,
    header,
    names,
)
from dockmirror.pull.ranges import parse_range, range_spec
from dockmirror.ranged import RangedFetch, RangeSupport, content_range
from dockmirror.routing import Route, Upstream
from dockmirror.streaming import BodyStream, StreamError, content_range_start
from dockmirror.upstream import discard

log = Logger()

#: Times a blob request tries to join or start a fill before giving up.
FILL_ATTEMPTS = 3
#: The most digits of a blob size heard from another process (a signed 64-bit integer).
MAX_SIZE_DIGITS = 18


@dataclass
class Source:
    """Where a blob's bytes will come from."""

    fill: Fill | FollowedFill | None = None  # being filled (None: cached)
    lead: bool = False  # this request started the fill
    passthrough: str | None = None  # why it is streamed uncached


class BlobService(UpstreamAccess):
    """Blobs from the cache, from fills in progress, or from the upstream uncached."""

    def __init__(self, context: PullContext) -> None:
        super().__init__(context)
        #: Upstreams seen to ignore Range, whose large blobs go in one stream for a while.
        self.ranges = RangeSupport(context.reactor)

    async def blob(self, route: Route, digest: str, head: bool, range_header: str | None) -> Reply:
        origin = origin_of(route)
        store = self.cache.blobs
        if head and not store.has(digest) and store.filling(digest) is None:
            size = await self._blob_head(route, origin, digest)
            if size is not None:
                self._admit(digest, size)
            self._count("blob", MISS)
            headers = _blob_headers(digest, MISS)
            if size is not None:
                headers["Content-Length"] = str(size)
            return Reply(200, headers)
        if not head and not store.has(digest) and store.filling(digest) is None:
            redirect = await self._redirect(route, origin, digest)
            if redirect is not None:
                return redirect
        source = await self.source(route, origin, digest)
        if source.passthrough is not None:
            self._metrics.cache_passthrough.labels(source.passthrough).inc()
            stored = None if head else await self._stored(route, origin, digest, range_header)
            return stored or await self._passthrough(route, origin, digest, head, range_header)
        shared = isinstance(source.fill, Fill) and source.fill.from_storage
        x_cache = MISS if source.lead and not shared else HIT
        self._count("blob", x_cache)
        store.touch(digest)
        size = source.fill.size if source.fill is not None else store.size_of(digest)
        assert size is not None
        headers = _blob_headers(digest, x_cache)
        if shared:
            headers[CACHE_TIER] = SHARED
        span = parse_range(range_header, size)
        start, end = span or (0, size)
        headers["Content-Length"] = str(end - start)
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if head:
            return Reply(206 if span else 200, headers)
        count = self._metrics.bytes_from_cache.inc if x_cache == HIT else _ignore
        try:
            reader = store.reader(digest, start, end, count)
        except BlobGone:
            # Evicted by another worker (or removed) since our look: from the upstream.
            self._metrics.cache_passthrough.labels("evicted").inc()
            return await self._passthrough(route, origin, digest, head, range_header)
        except OSError as e:
            # A transient error (EMFILE, EIO...) keeps the blob.
            log.error("cannot open cached {digest}: {error}", digest=digest, error=e.strerror)
            raise upstream_unavailable(route.upstream.name, "cache read failed", 503) from e
        return Reply(206 if span else 200, headers, stream=reader)

    async def source(self, route: Route, origin: str, digest: str) -> Source:
        """Find the blob in the cache or in a fill, starting one if need be."""
        store = self.cache.blobs
        error: Exception | None = None
        for _ in range(FILL_ATTEMPTS):
            if not store.allowed(origin, digest) or store.size_of(digest, origin) is None:
                if not await store.proved_elsewhere(origin, digest):
                    await self._blob_head(route, origin, digest)
            if store.has(digest):
                return Source()
            fill = store.filling(digest)
            lead = fill is None
            if fill is None:
                size = store.size_of(digest, origin)
                if size is None:
                    return Source(passthrough="size unknown")
                reason = self._admit(digest, size)
                parts = self._parts(route.upstream, size)
                started = reason or store.begin_fill(digest, size, route.upstream.name, parts)
                if isinstance(started, str):
                    return Source(passthrough=started)
                fill = started
                if isinstance(fill, Fill):
                    Deferred.fromCoroutine(self._fill(fill, route, origin)).addErrback(
                        _fill_crashed, fill
                    )
                else:  # another worker fills it
                    lead = False
            try:
                await fill.ready.wait()
            except CacheWriteError:
                return Source(passthrough="cache write failed")
            except (RegistryError, StreamError) as e:
                # What the upstream refused is final for the request that asked;
                # a follower asks through its own repository, and a fill that
                # could not start (the size changed, the disk failed) is retried.
                error = e
                if lead and isinstance(e, RegistryError):
                    break
                continue
            return Source(fill, lead)
        if isinstance(error, RegistryError):
            raise error
        raise upstream_unavailable(route.upstream.name, str(error), 502)

    async def _redirect(self, route: Route, origin: str, digest: str) -> Reply | None:
        """A 307 to the shared storage tier, if it redirects and holds the blob.

        The upstream repository must have proved it has the blob first, as
        for any blob served through it.
        """
        storage = self.cache.storage
        if storage is None or not storage.redirect:
            return None
        if not self.cache.blobs.allowed(origin, digest):
            await self._blob_head(route, origin, digest)
        location = await storage.location(digest)
        if location is None:
            return None
        self._count("blob", HIT)
        headers = _blob_headers(digest, HIT)
        headers.update({"Location": location, CACHE_TIER: SHARED, "Content-Length": "0"})
        return Reply(307, headers)

    async def _stored(
        self, route: Route, origin: str, digest: str, range_header: str | None
    ) -> Reply | None:
        """Stream a blob (or a range) the cache does not keep from the shared storage tier.

        The client's pace paces the read from the bucket.
        """
        storage = self.cache.storage
        size = self.cache.blobs.size_of(digest, origin)
        if storage is None or size is None:
            return None
        span = parse_range(range_header, size)
        start, end = span or (0, size)
        response = await storage.open(digest, size, start, end)
        if response is None:
            return None
        self._count("blob", HIT)
        headers = _blob_headers(digest, HIT)
        headers.update({CACHE_TIER: SHARED, "Content-Length": str(end - start)})
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        stream = BodyStream(
            response,
            self._reactor,
            length=end - start,
            digest=None if span else digest,
            idle_timeout=self.upstreams.client(route).read_timeout,
            count=self._metrics.bytes_from_storage.inc,
        )
        stream.done.addBoth(_passing(lambda outcome: storage.release(digest, outcome)))
        return Reply(206 if span else 200, headers, stream=stream)

    def _parts(self, upstream: Upstream, size: int) -> int:
        """The connections to fetch a blob of *size* bytes over, in ranges; 1: one stream."""
        if size < upstream.parallel_min_size or not self.ranges.splits(upstream.name):
            return 1
        if self.cache.blobs.coordinator.resumes:  # in a cluster, fills are single streams
            return 1
        return upstream.parallel_parts

    async def _fill(self, fill: Fill, route: Route, origin: str) -> None:
        """Fetch a blob into the cache, for every reader of *fill*.

        The shared storage tier, if any, is asked first; then the cluster,
        whose other nodes may fill it or hold it; then the upstream.  A blob
        the upstream sends is stored in the storage tier too, once verified,
        by the node holding its claim (see :meth:`_resume_fill`).
        """
        storage = self.cache.storage
        if storage is not None and await self._from_storage(fill):
            return
        digest, size = fill.digest, fill.size
        path = f"blobs/{digest}"
        read_timeout = self.upstreams.client(route).read_timeout
        coordinator = self.cache.blobs.coordinator
        resume = partial(self._resume_fill, fill, route) if coordinator.resumes else None
        response = await coordinator.lead(digest, size, 0)
        if fill.done:  # abandoned meanwhile: the mirror is stopping
            return
        if response is None and coordinator.resumes and storage is not None:
            # The cluster's claim is ours: its last holder may have stored the blob meanwhile.
            if await self._from_storage(fill):
                return
        if response is not None:
            fill.count_as(self._metrics.bytes_from_nodes)
            await fill.start(response, read_timeout, resume)
            return
        ranged = None
        if isinstance(fill, RangedFill):
            client = self.upstreams.client(route)

            async def resolve(headers: dict[str, str]) -> IResponse:
                return await self._request(route, "GET", path, headers)

            ranged = RangedFetch(fill, client, resolve, self.ranges, self._metrics, self._reactor)
        try:
            headers = ranged.first_headers() if ranged is not None else None
            response = await self._request(route, "GET", path, headers)
        except RegistryError as e:
            fill.abandon(e)
            return
        if response.code != 200 and not (ranged and response.code == 206):
            fill.abandon(await self._failure(route, response, "BLOB_UNKNOWN", False))
            return
        length = content_length(response)
        if response.code == 200 and length is not None and length != fill.size:
            discard(response)
            fill.abandon(StreamError(f"{length} bytes for {fill.digest}, {fill.size} expected"))
            return
        self.cache.blobs.allow(origin, fill.digest, length if response.code == 200 else fill.size)
        log.info(
            "filling {digest} ({size} bytes) from {upstream}{parts}",
            digest=fill.digest,
            size=fill.size,
            upstream=route.upstream.name,
            parts=f" in {len(fill.plan)} ranges" if isinstance(fill, RangedFill) else "",
        )
        if storage is not None:
            storage.upload(fill)
        if ranged is not None:
            await ranged.run(response)
        else:
            await fill.start(response, read_timeout, resume)

    async def _resume_fill(self, fill: Fill, route: Route, offset: int) -> IResponse:
        """The rest of a blob whose body broke at *offset*: from a node, or the upstream."""
        digest, size = fill.digest, fill.size
        response = await self.cache.blobs.coordinator.lead(digest, size, offset)
        if response is not None:
            fill.count_as(self._metrics.bytes_from_nodes)
            return response
        fill.count_as(self._metrics.bytes_from_upstream.labels(route.upstream.name))
        if self.cache.storage is not None:  # the claim is this node's now: so is the upload
            self.cache.storage.upload(fill)
        headers = {"Range": f"bytes={offset}-"} if offset else None
        response = await self._request(route, "GET", f"blobs/{digest}", headers)
        if response.code == 206 and content_range_start(response, size) == offset:
            return response
        if response.code == 200 and content_length(response) in (None, size):
            return response
        discard(response)
        raise StreamError(f"the upstream answered {response.code} to the rest of {digest}")

    async def _from_storage(self, fill: Fill) -> bool:
        """Fill from the shared storage tier, if it holds the blob; whether it does."""
        storage = self.cache.storage
        assert storage is not None
        stored = await storage.open(fill.digest, fill.size)
        if stored is None:
            return False
        fill.finished.wait().addBoth(lambda result: storage.release(fill.digest, result))
        await self._fill_from_storage(fill, stored)
        return True

    async def _fill_from_storage(self, fill: Fill, stored: IResponse) -> None:
        """Fill from the shared storage tier's whole-blob response, one stream."""
        fill.read_from_storage()
        log.info(
            "filling {digest} ({size} bytes) from the storage tier",
            digest=fill.digest,
            size=fill.size,
        )
        if not isinstance(fill, RangedFill):
            await fill.start(stored)
        elif await fill.open():
            body = PartBody(fill, 0, 0, fill.size, fill.size, self._reactor)
            body.done.addErrback(_abandon, fill)
            stored.deliverBody(body)
        else:
            discard(stored)

    def _blob_head(self, route: Route, origin: str, digest: str) -> Deferred[int | None]:
        """Ask the upstream repository for a blob: proof that it has it, and its size."""
        return self._flights.run(
            ("blob", origin, digest), lambda: self._ask_blob(route, origin, digest)
        )

    async def _ask_blob(self, route: Route, origin: str, digest: str) -> int | None:
        """The upstream's answer, asked by one process for every worker and node.

        The others hear ``[origin, digest, size]`` (the size empty if not announced).
        """
        flights = self.cache.flights
        key = "\n".join(("blob", origin, digest))
        heard = await flights.wait(key, cluster=True)
        if heard is not None and heard[:2] == [origin, digest] and len(heard) == 3:
            size = heard[2]
            if size == "" or (size.isdigit() and len(size) <= MAX_SIZE_DIGITS):
                length = int(size) if size else None
                self.cache.blobs.allow(origin, digest, length)
                return length
        result = None
        try:
            length = await self._head_blob(route, origin, digest)
            result = [origin, digest, "" if length is None else str(length)]
            return length
        finally:
            flights.done(key, result)

    async def _head_blob(self, route: Route, origin: str, digest: str) -> int | None:
        response = await self._request(route, "HEAD", f"blobs/{digest}")
        if response.code != 200:
            raise await self._failure(route, response, "BLOB_UNKNOWN", True)
        discard(response)
        content_type = (header(response, "content-type") or "").lower()
        if content_type.startswith("text/html") or not names(response, digest):
            # A portal or login page answering 200 to anything proves nothing.
            log.warn(
                "upstream {upstream} answered a HEAD of {digest} with a page"
                " ({content_type}) or another digest",
                upstream=route.upstream.name,
                digest=digest,
                content_type=printable(content_type),
            )
            raise upstream_unavailable(route.upstream.name, "the answer is not the blob", 502)
        length = content_length(response)
        self.cache.blobs.allow(origin, digest, length)
        return length

    def _admit(self, digest: str, size: int) -> str | None:
        """Apply ``max_layer_size``: None to cache, a reason to pass through, or refuse."""
        limit = self.cache.max_layer_size
        if limit is None or size <= limit:
            return None
        if self.cache.oversize == "reject":
            raise RegistryError(
                "DENIED",
                f"blob {digest} is {size} bytes, over this mirror's per-layer limit of"
                f" {limit} bytes (cache.max_layer_size)",
                {"digest": digest, "size": size, "limit": limit},
            )
        return "over max_layer_size"

    async def _passthrough(
        self, route: Route, origin: str, digest: str, head: bool, range_header: str | None
    ) -> Reply:
        """Stream a blob from the upstream without caching it.

        Only a single range is asked for: several would come back as
        ``multipart/byteranges``, so those are ignored, as for a cached blob.
        """
        headers = {"Range": range_header} if range_header and range_spec(range_header) else None
        response = await self._request(route, "HEAD" if head else "GET", f"blobs/{digest}", headers)
        if response.code not in (200, 206):
            raise await self._failure(route, response, "BLOB_UNKNOWN", head)
        self._count("blob", MISS)
        length = content_length(response)
        declared = self.cache.blobs.size_of(digest, origin)
        if response.code == 200 and declared is not None:
            # Bytes beyond the size the upstream announced to a HEAD are never sent.
            if length is not None and length != declared:
                discard(response)
                self.cache.blobs.doubt(digest, origin)
                raise upstream_unavailable(
                    route.upstream.name, f"{length} bytes for {digest}, {declared} expected", 502
                )
            length = declared
        span = content_range(response) if response.code == 206 else None
        if response.code == 206 and not _range_asked(span, length, headers, declared):
            # Other bytes than those asked for, which no digest check covers.
            discard(response)
            raise upstream_unavailable(
                route.upstream.name, f"a range of {digest} other than the one asked for", 502
            )
        reply_headers = _blob_headers(digest, MISS)
        if length is not None:
            reply_headers["Content-Length"] = str(length)
        if span is not None:
            start, end, total = span
            reply_headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
        if head:
            discard(response)
            return Reply(response.code, reply_headers)
        stream = BodyStream(
            response,
            self._reactor,
            length=length,
            digest=digest if response.code == 200 else None,
            idle_timeout=self.upstreams.client(route).read_timeout,
            count=self._metrics.bytes_from_upstream.labels(route.upstream.name).inc,
        )
        return Reply(response.code, reply_headers, stream=stream)


def _range_asked(
    span: tuple[int, int, int] | None,
    length: int | None,
    asked: dict[str, str] | None,
    declared: int | None,
) -> bool:
    """Whether a 206's ``Content-Range`` *span* (and *length*) is the range *asked* for.

    The blob's size is the one announced (*declared*) if the mirror knows it.
    """
    if span is None or asked is None:
        return False
    start, end, total = span
    if (declared is not None and total != declared) or length not in (None, end - start):
        return False
    try:
        return parse_range(asked["Range"], total) == (start, end)
    except RegistryError:  # past the end: no 206 should have answered it
        return False


def _blob_headers(digest: str, x_cache: str) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "X-Cache": x_cache,
    }


def _abandon(failure: Failure, fill: Fill) -> None:
    error = failure.value
    fill.abandon(error if isinstance(error, Exception) else StreamError(str(error)))


def _fill_crashed(failure: Failure, fill: Fill) -> None:
    log.failure("filling {digest} crashed", failure, digest=fill.digest)
    fill.abandon(StreamError(failure.getErrorMessage()))


def _passing(f: Callable[[Any], object]) -> Callable[[Any], Any]:
    """A callback that calls *f* with its input and passes the input on unchanged."""

    def callback(outcome: Any) -> Any:
        f(outcome)
        return outcome

    return callback


def _ignore(_: int) -> None:
    pass
