"""The pull side of the registry API, answered from the cache and the upstreams.

Each method returns a :class:`Reply` for the web layer to send; a blob body is
a stream (a :class:`~dockmirror.cache.reader.BlobReader` from the cache, or a
:class:`~dockmirror.streaming.BodyStream` from the upstream) that the web
layer points at the client's request.  Each concept has its module:
manifests, blobs, referrers, tags and prefetch, over the shared
:mod:`~dockmirror.pull.access`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from twisted.internet.interfaces import IReactorTime

from dockmirror.cache import Cache
from dockmirror.metrics import Metrics
from dockmirror.pull.access import PullContext, Reply
from dockmirror.pull.blobs import BlobService
from dockmirror.pull.manifests import ManifestService
from dockmirror.pull.prefetch import ImagePrefetch
from dockmirror.pull.referrers import ReferrersService
from dockmirror.pull.tags import TagsService
from dockmirror.pull.upstreams import Upstreams
from dockmirror.reference import parse_image_reference
from dockmirror.routing import Route, Router

__all__ = ["Prefetcher", "PullService", "Reply", "Upstreams"]


class PullService:
    """Answers pulls from the cache, going upstream for what it lacks.

    Blobs: a cached blob is served from its file; a missing one is filled
    once, however many clients ask, each reading the file as it grows.
    Manifests: by digest from the cache; by tag for ``manifest_ttl``
    seconds, then revalidated with a HEAD.  Every reply says ``X-Cache``.
    """

    def __init__(
        self, upstreams: Upstreams, reactor: IReactorTime, metrics: Metrics, cache: Cache
    ) -> None:
        context = PullContext(upstreams, reactor, metrics, cache)
        self.cache = cache
        self.manifests = ManifestService(context)
        self.blobs = BlobService(context)
        self._referrers = ReferrersService(context)
        self._tags = TagsService(context)
        self._images = ImagePrefetch(self.manifests, self.blobs)

    async def manifest(self, route: Route, reference: str, accept: str | None, head: bool) -> Reply:
        return await self.manifests.manifest(route, reference, accept, head)

    async def blob(self, route: Route, digest: str, head: bool, range_header: str | None) -> Reply:
        return await self.blobs.blob(route, digest, head, range_header)

    async def referrers(
        self, route: Route, digest: str, artifact_type: str | None, head: bool
    ) -> Reply:
        return await self._referrers.referrers(route, digest, artifact_type, head)

    async def tags(self, route: Route, n: str | None, last: str | None) -> Reply:
        return await self._tags.tags(route, n, last)

    async def prefetch(
        self, route: Route, reference: str, platforms: Collection[str] = (), refresh: bool = False
    ) -> dict[str, Any]:
        """Fill the cache with an image (see :meth:`ImagePrefetch.prefetch`)."""
        return await self._images.prefetch(route, reference, platforms, refresh)


class Prefetcher:
    """Warms the cache for an image named as a client would (for the operator shell)."""

    def __init__(self, router: Router, pull: PullService) -> None:
        self.router = router
        self.pull = pull

    def __repr__(self) -> str:
        return f"<Prefetcher via {self.pull!r}>"

    async def prefetch(self, image_reference: str) -> dict[str, Any]:
        image = parse_image_reference(image_reference)
        route = self.router.route(image.name)
        summary = await self.pull.prefetch(route, image.reference)
        return {"image": image_reference, "upstream": route.key, **summary}
