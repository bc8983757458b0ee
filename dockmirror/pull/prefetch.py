"""Prefetch: fill the cache with a whole image, its manifests and their blobs."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore

from dockmirror.cache import origin_of
from dockmirror.cache.manifests import INDEX_TYPES, references
from dockmirror.errors import RegistryError
from dockmirror.pull.access import STALE, Reply
from dockmirror.pull.blobs import BlobService
from dockmirror.pull.manifests import ManifestService
from dockmirror.reference import is_digest
from dockmirror.routing import Route
from dockmirror.streaming import StreamError

#: Blobs of one manifest fetched at once by :meth:`ImagePrefetch.prefetch`.
PREFETCH_PARALLEL = 4


class ImagePrefetch:
    """Fetches an image's manifests, then its blobs a few at a time, into the cache."""

    def __init__(self, manifests: ManifestService, blobs: BlobService) -> None:
        self._manifests = manifests
        self._blobs = blobs

    async def prefetch(
        self, route: Route, reference: str, platforms: Collection[str] = (), refresh: bool = False
    ) -> dict[str, Any]:
        """Fill the cache with an image: its manifests, its platforms, and their blobs.

        *platforms* limits a multi-platform image to those (all without);
        *refresh* asks the upstream what a tag is now, however fresh the cache.
        """
        summary: dict[str, Any] = {
            "digest": None,
            "manifests": 0,
            "blobs": 0,
            "fetched_bytes": 0,
            "already_cached": 0,
            "not_cached": [],
            "errors": [],
        }
        if refresh and not is_digest(reference):
            reply = await self._manifests.refresh_tag(route, reference)
        else:
            reply = await self._manifests.manifest(route, reference, None, head=False)
        summary["digest"] = reply.headers.get("Docker-Content-Digest")
        if reply.headers["X-Cache"] == STALE:
            summary["errors"].append(f"{reference}: the upstream could not be asked")
        await self._prefetch_manifest(route, reply, summary, platforms)
        return summary

    async def _prefetch_manifest(
        self, route: Route, reply: Reply, summary: dict[str, Any], platforms: Collection[str]
    ) -> None:
        summary["manifests"] += 1
        if reply.headers["Content-Type"] in INDEX_TYPES:
            for child, _ in references(reply.body, platforms):
                child_reply = await self._manifests.manifest(route, child, None, head=False)
                await self._prefetch_manifest(route, child_reply, summary, platforms)
            return
        refs = references(reply.body)
        semaphore = DeferredSemaphore(PREFETCH_PARALLEL)
        await DeferredList(
            [
                semaphore.run(
                    lambda d: Deferred.fromCoroutine(self._prefetch_blob(route, d, summary)),
                    digest,
                )
                for digest, _ in refs
            ]
        )

    async def _prefetch_blob(self, route: Route, digest: str, summary: dict[str, Any]) -> None:
        summary["blobs"] += 1
        try:
            source = await self._blobs.source(route, origin_of(route), digest)
            if source.passthrough is not None:
                summary["not_cached"].append(f"{digest}: {source.passthrough}")
            elif source.fill is None:
                summary["already_cached"] += 1
            else:
                await source.fill.finished.wait()
                summary["fetched_bytes"] += source.fill.size
        except (RegistryError, StreamError) as e:
            summary["errors"].append(f"{digest}: {e}")
