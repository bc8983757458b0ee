"""Warm lists: images kept cached and fresh, so that their next pull is a hit.

Every ``[warm] interval``, and when an operator asks (the manhole's
``warm.run()``, ``dockmirror-admin warm run``), a round goes through
``[warm] images`` one by one:

- the tag is asked for with a ``HEAD``, which does not count against Docker
  Hub's pull limit, whatever the cache holds;
- what the cache lacks of it (a moved tag's new manifests, their blobs) is
  fetched as :meth:`~dockmirror.pull.PullService.prefetch` does, limited to
  ``[warm] platforms``;
- the blobs of the warm images are then kept from eviction, image by image
  in list order, as long as they fit in ``[warm] max_share`` of the quota.

One round runs at a time: asking for a round while one runs waits for it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dockmirror.cache import Cache, origin_of
from dockmirror.cache.manifests import references
from dockmirror.config import WarmConfig, WarmImage
from dockmirror.errors import RegistryError
from dockmirror.metrics import Metrics
from dockmirror.pull import PullService
from dockmirror.routing import Router
from dockmirror.shared import Event
from dockmirror.streaming import StreamError

log = Logger()

#: What a round did with an image, the values of ``dockmirror_warm_images{result}``.
RESULTS = ("unchanged", "updated", "failed")


@dataclass
class ImageResult:
    image: str
    result: str
    digest: str | None = None
    fetched_bytes: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class RoundResult:
    started: float
    ended: float = 0.0
    images: list[ImageResult] = field(default_factory=list)
    kept_bytes: int = 0
    #: Images whose blobs did not fit in ``max_share``: they may be evicted.
    not_kept: list[str] = field(default_factory=list)

    def count(self, result: str) -> int:
        return sum(1 for image in self.images if image.result == result)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "images": len(self.images),
            **{result: self.count(result) for result in RESULTS},
            "fetched_bytes": sum(image.fetched_bytes for image in self.images),
            "kept_bytes": self.kept_bytes,
            "not_kept": self.not_kept,
            "seconds": round(self.ended - self.started, 3),
            "results": [image.to_json() for image in self.images],
        }

    def __repr__(self) -> str:
        return f"<warm round: {self.to_json()!r}>"


class Warmer(TimerService):
    """Runs warm rounds every ``interval`` seconds, and on demand."""

    name = "warm"

    def __init__(
        self,
        config: WarmConfig,
        images: Sequence[WarmImage],
        router: Router,
        pull: PullService,
        cache: Cache,
        metrics: Metrics,
        reactor: IReactorTime,
    ) -> None:
        super().__init__(config.interval_seconds, self._scheduled)
        self.clock = self._reactor = reactor
        self.images = list(images)
        self.platforms: Collection[str] = config.platforms
        self.max_share = config.max_share
        self._router = router
        self._pull = pull
        self._cache = cache
        self._metrics = metrics
        self._running: Event[RoundResult] | None = None
        self._task: Deferred[None] | None = None
        #: The result of the last round that ended, for the operator.
        self.last: RoundResult | None = None

    def __repr__(self) -> str:
        state = "running" if self._running is not None else "idle"
        last = "no round yet" if self.last is None else f"last round ok={self.last.ok}"
        return (
            f"<warm: {len(self.images)} images every {self.step:g}s, {state}, {last}; run(), last>"
        )

    def startService(self) -> None:
        # Keep what earlier runs warmed before the first round ends.
        self.keep()
        super().startService()

    def stopService(self) -> Deferred[None]:
        if self._task is not None:
            self._task.cancel()
        return super().stopService()

    def run(self) -> Deferred[RoundResult]:
        """Run a round, or join the one running; fires with its result."""
        event = self._running
        if event is None:
            event = self._running = Event()
            task = Deferred.fromCoroutine(self._round(event))
            task.addErrback(lambda _: None)  # the waiters have the failure
            if self._running is event:  # not over already
                self._task = task
        return event.wait()

    def _scheduled(self) -> Deferred[None]:
        """The timer's round; its failure is logged, and the timer goes on."""

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                log.failure("warm round failed", failure)

        return self.run().addCallbacks(lambda _: None, failed)

    async def _round(self, event: Event[RoundResult]) -> None:
        result = RoundResult(started=self._reactor.seconds())
        try:
            for image in self.images:
                result.images.append(await self._warm(image))
            result.kept_bytes, result.not_kept = self.keep()
            result.ended = self._reactor.seconds()
            self._count(result)
        except BaseException as e:
            event.fire(e if isinstance(e, Exception) else CancelledError())
            raise
        finally:
            self._running = self._task = None
        self.last = result
        event.fire(result)

    async def _warm(self, image: WarmImage) -> ImageResult:
        name = str(image)
        try:
            route = self._router.route_to(image.upstream, image.repository, image.alias)
            before = self._cache.manifests.tag(origin_of(route), image.tag, None)
            summary = await self._pull.prefetch(route, image.tag, self.platforms, refresh=True)
        except (RegistryError, StreamError) as e:
            log.warn("warm {image}: {error}", image=name, error=str(e))
            return ImageResult(name, "failed", error=str(e))
        digest = summary["digest"]
        fetched = summary["fetched_bytes"]
        problems = [*summary["errors"], *summary["not_cached"]]
        if problems:
            log.warn("warm {image}: {problems}", image=name, problems="; ".join(problems))
            return ImageResult(name, "failed", digest, fetched, "; ".join(problems)[:1000])
        moved = before is None or before.digest != digest
        outcome = "updated" if moved or fetched else "unchanged"
        log.info(
            "warm {image}: {outcome} at {digest}, {fetched} bytes fetched",
            image=name,
            outcome=outcome,
            digest=digest,
            fetched=fetched,
        )
        return ImageResult(name, outcome, digest, fetched)

    def keep(self) -> tuple[int, list[str]]:
        """Keep the warm images' cached blobs from eviction, within ``max_share``.

        Images are taken in list order; one that does not fit whole is left
        to the LRU, and later, smaller ones may still fit.  Returns the bytes
        kept and the images left out.
        """
        store = self._cache.blobs
        limit = None if store.max_size is None else int(store.max_size * self.max_share)
        kept: dict[str, int] = {}
        left_out = []
        for image in self.images:
            blobs = self._cached_blobs(image)
            extra = sum(size for digest, size in blobs.items() if digest not in kept)
            if limit is not None and sum(kept.values()) + extra > limit:
                left_out.append(str(image))
                continue
            kept.update(blobs)
        store.keep(kept)
        total = sum(kept.values())
        self._metrics.warm_kept_bytes.set(total)
        if left_out and self.max_share > 0:
            log.warn(
                "warm: {count} images do not fit in max_share of the cache and may be"
                " evicted: {images}",
                count=len(left_out),
                images=", ".join(left_out[:10]),
            )
        return total, left_out

    def _cached_blobs(self, image: WarmImage) -> dict[str, int]:
        """The cached manifests and blobs of a warm image's tag, with their sizes."""
        try:
            route = self._router.route_to(image.upstream, image.repository, image.alias)
        except RegistryError:
            return {}
        manifests, store = self._cache.manifests, self._cache.blobs
        entry = manifests.tag(origin_of(route), image.tag, None)
        found: dict[str, int] = {}
        pending = [entry.digest] if entry is not None else []
        while pending:
            digest = pending.pop()
            size = store.size_of(digest) if store.has(digest) else None
            if digest in found or size is None:
                continue
            found[digest] = size
            try:
                cached = manifests.get(digest) if manifests.has(digest) else None
            except OSError:
                cached = None
            if cached is not None:
                pending.extend(d for d, _ in references(cached[0], self.platforms))
        return found

    def _count(self, result: RoundResult) -> None:
        metrics = self._metrics
        for outcome in RESULTS:
            metrics.warm_images.labels(outcome).set(result.count(outcome))
        metrics.warm_bytes.inc(sum(image.fetched_bytes for image in result.images))
        metrics.warm_failures.inc(result.count("failed"))
        metrics.warm_rounds.labels("ok" if result.ok else "failed").inc()
        if result.ok:
            metrics.warm_last_success.set(result.ended)
        log.info(
            "warm round: {images} images, {updated} updated, {failed} failed,"
            " {kept} bytes kept from eviction",
            images=len(result.images),
            updated=result.count("updated"),
            failed=result.count("failed"),
            kept=result.kept_bytes,
        )
