"""The cache: layers and manifests kept on disk, shared by every upstream.

:class:`Cache` is the service that owns the store, its index and their
worker threads, and the object the operator shell works with::

    >>> cache.stats()
    >>> cache.purge("dockerhub/library/alpine")    # or a digest
    >>> cache.prefetch("ghcr.io/owner/image:tag")  # a Deferred
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from dockmirror._interfaces import IBlobStorage, INotifier
from dockmirror.cache import files
from dockmirror.cache.blobs import BlobStore
from dockmirror.cache.index import Index, Runner
from dockmirror.cache.manifests import ManifestCache
from dockmirror.cache.referrers import ReferrersCache
from dockmirror.config import CacheConfig, StorageConfig
from dockmirror.coordination import FileLockCoordinator, LocalNotifier, SharedFlights
from dockmirror.metrics import Metrics
from dockmirror.reference import DIGEST_RE
from dockmirror.routing import Route
from dockmirror.storage import build_storage
from dockmirror.storage.records import IndexRecords

log = Logger()

#: Worker threads writing and removing cache files.
IO_THREADS = 4
#: Seconds a stopping mirror lets fills in progress finish (systemd waits 45).
STOP_GRACE = 30.0
#: What one worker tells the others to purge: [repository or digest], so long at most.
PURGE_TOPIC = "purge"
PURGE_MAX = 300
#: One worker tells the others that it wrote the blobs it keeps from eviction: [].
KEEP_TOPIC = "kept"
#: One worker tells the others of a manifest it fetched (see :attr:`Cache.flights`).
MANIFEST_TOPIC = "manifest"


def origin_of(route: Route) -> str:
    """How the cache names an upstream repository: its config name, repository and URL."""
    return f"{route.key} {route.base_url}"


def _origin_matches(origin: str, what: str) -> bool:
    """Whether *what* (``upstream/repository`` or ``repository``) names *origin*."""
    key = origin.partition(" ")[0]
    return what in (key, key.partition("/")[2])


class Prefetcher(Protocol):
    async def prefetch(self, image_reference: str) -> dict[str, Any]: ...


class Cache(service.Service):
    name = "cache"

    def __init__(
        self,
        config: CacheConfig,
        reactor: Any,
        metrics: Metrics,
        *,
        run: Runner | None = None,
        run_index: Runner | None = None,
        shared: bool = False,
        storage: StorageConfig | None = None,
    ) -> None:
        """*run* and *run_index* run blocking work in threads; by default, the cache's own.

        A *shared* cache is used by several worker processes at once, which
        coordinate their fills through :mod:`dockmirror.coordination`.
        *storage* may add a second tier below the directory (``[storage]``).
        """
        self.shared = shared
        self.directory = config.directory
        self.max_layer_size = config.max_layer_size_bytes
        self.oversize = config.oversize
        self.serve_stale = config.serve_stale
        self.metrics = metrics
        self._pools: list[ThreadPool] = []
        self._lock_fd: int | None = None
        if run is None:
            run = self._pool(reactor, "dockmirror-cache-io", IO_THREADS)
        if run_index is None:
            run_index = self._pool(reactor, "dockmirror-cache-index", 1)
        self.index = Index(os.path.join(self.directory, "index.sqlite"), reactor, run_index)
        self.blobs = BlobStore(
            self.directory,
            config.max_size_bytes,
            self.index,
            reactor,
            run,
            metrics,
            min_free=config.min_free_bytes,
        )
        self.manifests = ManifestCache(
            self.blobs, self.index, reactor, config.manifest_ttl, config.max_tags
        )
        self.referrers = ReferrersCache(reactor, config.manifest_ttl)
        #: The shared tier below the directory, if any.
        self.storage: IBlobStorage | None = build_storage(
            storage or StorageConfig(), reactor, run, IndexRecords(self.index), metrics
        )
        #: Manifest fetches, one for every worker: the result is
        #: ``[origin, reference, digest, media type]``, cached by the fetching worker.
        self.flights = SharedFlights(reactor, MANIFEST_TOPIC)
        self.flights.on_result.append(self.manifests.fetched_elsewhere)
        #: Warms the cache for :meth:`prefetch`; attached once the pull side exists.
        self.prefetcher: Prefetcher | None = None
        self._notifier: INotifier = LocalNotifier()
        #: Called with what each purge made here names, for the nodes of a cluster ...
        self.on_purge: list[Callable[[str], None]] = []
        #: ... and with what each purge another process announced names.
        self.on_purge_heard: list[Callable[[str], None]] = []
        #: How far the cluster's purges were applied here, as the index said at start.
        self.purges_applied: tuple[int, float] = (0, 0.0)

    def share(self, notifier: INotifier) -> None:
        """Purge in every worker what is purged in one; keep what one keeps."""
        self._notifier = notifier
        notifier.subscribe(PURGE_TOPIC, self._purged_elsewhere)
        notifier.subscribe(KEEP_TOPIC, lambda message: self.blobs.reload_kept())
        self.flights.share(notifier)
        self.blobs.on_keep.append(lambda: notifier.publish(KEEP_TOPIC, []))

    def _purged_elsewhere(self, message: list[str]) -> None:
        if len(message) == 1 and len(message[0]) <= PURGE_MAX:
            for hook in self.on_purge_heard:
                hook(message[0])
            self.purged_elsewhere(message[0])

    def purged_elsewhere(self, what: str) -> None:
        """Drop here what another process purged (heard of, or found in the cluster's records)."""
        if len(what) <= PURGE_MAX:
            self._purge(what)

    def _pool(self, reactor: Any, name: str, threads: int) -> Runner:
        pool = ThreadPool(minthreads=1, maxthreads=threads, name=name)
        self._pools.append(pool)
        return partial(deferToThreadPool, reactor, pool)

    def __repr__(self) -> str:
        stats = self.stats()
        quota = f" of {stats['max_size']}" if stats["max_size"] is not None else ""
        return (
            f"<cache {self.directory}: {stats['blobs']} blobs, {stats['size']}{quota} bytes,"
            f" {len(stats['fills'])} fills; stats(), purge(repository or digest),"
            " prefetch(image)>"
        )

    def startService(self) -> None:
        """Recover the cache before the mirror listens: blocking, and on purpose."""
        files.make_directory(self.directory)
        self._lock_fd = self._lock("lock", fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
        if self.shared:
            self.blobs.coordinator = self.flights.coordinator = FileLockCoordinator(self.directory)
        for pool in self._pools:
            pool.start()
        # Workers starting together recover one at a time.
        recovering = self._lock("recover.lock", fcntl.LOCK_EX, wait=True)
        try:
            snapshot = self.index.load()
            self.blobs.recover(snapshot)
            self.manifests.recover(snapshot)
            self.purges_applied = snapshot.purges
        finally:
            os.close(recovering)
        if self.storage is not None:
            self.storage.start(snapshot.objects)
        super().startService()

    def _lock(self, name: str, operation: int, wait: bool = False) -> int:
        """Hold the directory: a process not of this service would delete our fills.

        The workers of one service hold it shared, a lone process exclusively.
        """
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, files.FILE_MODE)
        try:
            fcntl.flock(fd, operation | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"cache directory {self.directory} is in use by another dockmirror process"
            ) from None
        return fd

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stopping = Deferred.fromCoroutine(self.blobs.stop(STOP_GRACE))
        if self.storage is not None:
            storage = self.storage
            stopping.addBoth(lambda _: storage.stop())

        def stop_pools(result: object) -> object:
            for pool in self._pools:
                pool.stop()
            self.blobs.coordinator.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            return result

        return stopping.addBoth(lambda _: self.index.close()).addBoth(stop_pools)

    # --- for the operator ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What the cache holds, and what it is doing."""
        registry = self.metrics.registry

        def counts(name: str) -> dict[str, int]:
            return {
                kind: int(registry.get_sample_value(name, {"kind": kind}) or 0)
                for kind in ("blob", "manifest")
            }

        return {
            **self.blobs.stats(),
            **self.manifests.stats(),
            "hits": counts("dockmirror_cache_hits_total"),
            "misses": counts("dockmirror_cache_misses_total"),
            "max_layer_size": self.max_layer_size,
            "oversize": self.oversize,
            "manifest_ttl": self.manifests.ttl,
            **({"storage": self.storage.stats()} if self.storage is not None else {}),
        }

    def purge(self, repository_or_digest: str) -> dict[str, Any]:
        """Drop one digest, or all a repository's tags, access and unshared blobs.

        A repository is named ``upstream/repository`` or just ``repository``.
        Blobs another repository also has stay; blobs being read stay too.
        With a shared storage tier, what is purged here is deleted there too.
        """
        what = repository_or_digest.strip()
        result = self._purge(what)
        if self.storage is not None:
            digests = [what] if DIGEST_RE.fullmatch(what) else result.get("purged", [])
            result["storage"] = {
                d: "removed" if self.storage.remove(d) else "in use" for d in digests
            }
        if len(what) <= PURGE_MAX:
            self._notifier.publish(PURGE_TOPIC, [what])
            for hook in self.on_purge:
                hook(what)
        return result

    def _purge(self, what: str) -> dict[str, Any]:
        if DIGEST_RE.fullmatch(what):
            if self.blobs.remove(what):
                return {"purged": [what]}
            reason = "in use" if self.blobs.has(what) else "not cached"
            return {"purged": [], "kept": {what: reason}}
        origins = {
            o
            for o in self.blobs.origins() | self.manifests.tag_origins()
            if _origin_matches(o, what)
        }
        if not origins:
            return {
                "purged": [],
                "error": f"nothing cached for {what} (name it as upstream/repository,"
                " e.g. dockerhub/library/alpine, or as repository, or give a digest)",
            }
        tags = self.manifests.forget_origins(origins)
        self.referrers.forget_origins(origins)
        orphans = self.blobs.disown(origins)
        purged = [d for d in orphans if self.blobs.remove(d)]
        return {
            "repositories": sorted(o.partition(" ")[0] for o in origins),
            "tags": tags,
            "purged": purged,
            "kept": {d: "in use" for d in orphans if d not in purged},
        }

    def prefetch(self, image_reference: str) -> Deferred[dict[str, Any]]:
        """Fetch an image, every platform of it, into the cache; fires with a summary."""
        if self.prefetcher is None:
            raise RuntimeError("no prefetcher attached to the cache")
        return Deferred.fromCoroutine(self.prefetcher.prefetch(image_reference))
