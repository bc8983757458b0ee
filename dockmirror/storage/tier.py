"""An S3 bucket as the cache's second tier, shared by every node.

Objects are named by digest, ``<prefix>blobs/sha256/<hex>``, layers and
manifests alike, so that an operator can audit the bucket.  The quota
(``[storage] max_size``) is kept by LRU over the objects this node knows of:
those it recorded, and those it finds listing the bucket at start.  At
start, and hourly, incomplete multipart uploads older than
``stale_uploads`` (left by a node that died mid-fill) are aborted.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from dockmirror._interfaces import IBlobStorage, IStorageRecords
from dockmirror.cache.index import Runner
from dockmirror.cache.progress import FillProgress
from dockmirror.config import StorageConfig
from dockmirror.metrics import Metrics
from dockmirror.reference import HEX_LENGTH
from dockmirror.storage.quota import Quota
from dockmirror.storage.s3 import PRESIGN_EXPIRY, S3Client, S3Error
from dockmirror.storage.upload import BlobUpload
from dockmirror.streaming import DigestMismatch
from dockmirror.upstream import discard

log = Logger()

#: Seconds between sweeps of incomplete uploads.
SWEEP_INTERVAL = 3600.0
#: Seconds a stopping node lets uploads in progress finish.
STOP_GRACE = 20.0


@implementer(IBlobStorage)
class S3Storage:
    def __init__(
        self,
        config: StorageConfig,
        reactor: IReactorTime,
        run: Runner,
        records: IStorageRecords,
        metrics: Metrics,
        client: S3Client | None = None,
    ) -> None:
        self.redirect = config.redirect
        self.prefix = config.prefix
        self.stale_uploads = config.stale_uploads_seconds
        self.client = client if client is not None else S3Client(config, reactor)
        self.quota = Quota(records, config.max_size_bytes)
        self._reactor = reactor
        self._run = run
        self._metrics = metrics
        #: Uploads in progress, by digest.
        self._uploads: dict[str, Deferred[None]] = {}
        #: Objects clients were sent to, until their URLs expire.
        self._lent: dict[str, IDelayedCall] = {}
        self._sweeper = LoopingCall(self._sweep_now)
        self._sweeper.clock = reactor

    def __repr__(self) -> str:
        return f"<S3Storage {self.client.bucket}/{self.prefix}: {self.quota!r}>"

    def key(self, digest: str) -> str:
        algorithm, _, hexpart = digest.partition(":")
        return f"{self.prefix}blobs/{algorithm}/{hexpart}"

    def digest_of(self, key: str) -> str | None:
        """The digest an object key names, if it is one of ours."""
        ours = self.prefix + "blobs/"
        if not key.startswith(ours):
            return None
        algorithm, _, hexpart = key[len(ours) :].partition("/")
        length = HEX_LENGTH.get(algorithm)
        if length is None or len(hexpart) != length:
            return None
        if not all(c in "0123456789abcdef" for c in hexpart):
            return None
        return f"{algorithm}:{hexpart}"

    # --- start and stop ------------------------------------------------------------

    def start(self, objects: Any) -> None:
        self.quota.load(objects)
        Deferred.fromCoroutine(self._reconcile()).addErrback(self._unusable)
        self._sweeper.start(SWEEP_INTERVAL, now=True).addErrback(
            lambda f: log.failure("the upload sweeper stopped", f)
        )

    def stop(self) -> Deferred[None]:
        if self._sweeper.running:
            self._sweeper.stop()
        for lent in self._lent.values():
            lent.cancel()
        self._lent.clear()
        uploads = list(self._uploads.values())
        waiting: Deferred[Any] = DeferredList(uploads, consumeErrors=True)
        if uploads:
            log.info("waiting up to {grace}s for {n} uploads", grace=STOP_GRACE, n=len(uploads))
            waiting.addTimeout(STOP_GRACE, self._reactor)

        def cancel(failure: Failure) -> Deferred[Any]:
            failure.trap(TimeoutError)
            for upload in list(self._uploads.values()):
                upload.cancel()  # aborts it
            return DeferredList(list(self._uploads.values()), consumeErrors=True)

        waiting.addErrback(cancel)
        waiting.addBoth(lambda _: self.client.close())
        return waiting

    async def _reconcile(self) -> None:
        """Learn what the bucket holds: objects found are added, objects gone forgotten."""
        now = self._reactor.seconds()
        known = self.quota.digests()  # what is stored while listing is not forgotten
        found = {}
        for info in await self.client.list_objects(self.prefix + "blobs/"):
            digest = self.digest_of(info.key)
            if digest is not None:
                found[digest] = info
        for digest in known:
            if digest not in found and not self.quota.pinned(digest):
                self.quota.forget(digest)
        for digest, info in sorted(found.items(), key=lambda item: item[1].modified):
            if digest not in self.quota:
                self.quota.add(digest, info.size, min(info.modified, now))
        log.info(
            "storage bucket {bucket}/{prefix}: {count} blobs, {size} bytes",
            bucket=self.client.bucket,
            prefix=self.prefix,
            count=len(self.quota),
            size=self.quota.size,
        )
        for digest in self.quota.victims() or []:
            self._evict(digest)

    def _unusable(self, failure: Failure) -> None:
        """The bucket cannot be listed at start: say why, without a traceback for S3's answers."""
        if not failure.check(S3Error):
            log.failure("listing the storage bucket failed", failure)
            return
        log.error(
            "storage bucket {bucket} cannot be used now: {error}; blobs come from the upstreams",
            bucket=self.client.bucket,
            error=failure.getErrorMessage(),
        )

    def _sweep_now(self) -> Deferred[int | None]:
        return Deferred.fromCoroutine(self.sweep()).addErrback(
            lambda f: log.warn("sweeping incomplete uploads failed: {error}", error=f.value)
        )

    async def sweep(self) -> int:
        """Abort incomplete uploads under the prefix older than ``stale_uploads``."""
        ours = {self.key(digest) for digest in self._uploads}
        cutoff = self._reactor.seconds() - self.stale_uploads
        aborted = 0
        for upload in await self.client.list_uploads(self.prefix + "blobs/"):
            if upload.initiated <= cutoff and upload.key not in ours:
                await self.client.abort_upload(upload.key, upload.upload_id)
                aborted += 1
        if aborted:
            log.info("aborted {count} incomplete uploads to the storage bucket", count=aborted)
        return aborted

    # --- reading -------------------------------------------------------------------

    def open(
        self, digest: str, size: int, start: int = 0, end: int | None = None
    ) -> Deferred[IResponse | None]:
        return Deferred.fromCoroutine(self._open(digest, size, start, end))

    async def _open(self, digest: str, size: int, start: int, end: int | None) -> IResponse | None:
        self.quota.pin(digest)
        whole = start == 0 and end in (None, size)
        try:
            response = await self.client.get(
                self.key(digest), *((0, None) if whole else (start, end))
            )
        except S3Error as e:
            self.quota.unpin(digest)
            self._unavailable(digest, e)
            return None
        if response is None:
            self.quota.unpin(digest)
            self.quota.forget(digest)
            return None
        if response.length not in ((end or size) - start, UNKNOWN_LENGTH):
            self.quota.unpin(digest)
            discard(response)
            log.warn(
                "stored {digest} is {length} bytes, not {size}: fetched from the upstream",
                digest=digest,
                length=response.length,
                size=size,
            )
            return None
        self._read(digest, size)
        return response

    def read_small(self, digest: str, limit: int) -> Deferred[tuple[bytes, str | None] | None]:
        return Deferred.fromCoroutine(self._read_small(digest, limit))

    async def _read_small(self, digest: str, limit: int) -> tuple[bytes, str | None] | None:
        try:
            response = await self.client.get(self.key(digest))
            if response is None:
                self.quota.forget(digest)
                return None
            if response.length != UNKNOWN_LENGTH and response.length > limit:
                discard(response)
                return None
            body = await self.client.read(response, limit)
        except S3Error as e:
            self._unavailable(digest, e)
            return None
        self._read(digest, len(body))
        types = response.headers.getRawHeaders("content-type") or [None]
        return body, types[0]

    def release(self, digest: str, outcome: Any) -> None:
        self.quota.unpin(digest)
        error = outcome.value if isinstance(outcome, Failure) else outcome
        if isinstance(error, DigestMismatch):
            log.error("stored {digest} does not match its digest: removed", digest=digest)
            self._evict(digest, "it is corrupt")

    def location(self, digest: str) -> Deferred[str | None]:
        return Deferred.fromCoroutine(self._location(digest))

    async def _location(self, digest: str) -> str | None:
        key = self.key(digest)
        try:
            size = await self.client.head(key)
            if size is None:
                self.quota.forget(digest)
                return None
            url = await self.client.presign(key, PRESIGN_EXPIRY)
        except S3Error as e:
            self._unavailable(digest, e)
            return None
        self._read(digest, size)
        self._lend(digest)
        return url

    def _lend(self, digest: str) -> None:
        """Keep *digest* from eviction while a presigned URL to it is valid."""
        lent = self._lent.get(digest)
        if lent is not None:
            lent.reset(PRESIGN_EXPIRY)
            return
        self.quota.pin(digest)

        def expired() -> None:
            del self._lent[digest]
            self.quota.unpin(digest)

        self._lent[digest] = self._reactor.callLater(PRESIGN_EXPIRY, expired)

    def _read(self, digest: str, size: int) -> None:
        """The bucket holds *digest* and it is being read: the most recently used."""
        now = self._reactor.seconds()
        if digest in self.quota:
            self.quota.touch(digest, now)
        else:
            self.quota.add(digest, size, now)

    def _unavailable(self, digest: str, error: S3Error) -> None:
        log.warn(
            "storage bucket {bucket} unavailable ({error}): {digest} comes from the upstream",
            bucket=self.client.bucket,
            error=str(error),
            digest=digest,
        )

    # --- writing -------------------------------------------------------------------

    def upload(self, fill: Any) -> None:
        progress: FillProgress = fill
        digest, size = progress.digest, progress.size
        if digest in self.quota or digest in self._uploads:
            return
        victims = self.quota.reserve(digest, size)
        if victims is None:
            log.warn(
                "{digest} ({size} bytes) not stored: the storage quota is full of blobs in use",
                digest=digest,
                size=size,
            )
            return
        for victim in victims:
            self._evict(victim)
        upload = BlobUpload(self.client, self.key(digest), progress, self._run)
        upload.attach()
        self._track(digest, size, Deferred.fromCoroutine(upload.run()))

    def put(self, digest: str, data: bytes, media_type: str) -> None:
        if digest in self.quota or digest in self._uploads:
            self.quota.touch(digest, self._reactor.seconds())
            return
        victims = self.quota.reserve(digest, len(data))
        if victims is None:
            return
        for victim in victims:
            self._evict(victim)
        self._track(digest, len(data), Deferred.fromCoroutine(self._put(digest, data, media_type)))

    async def _put(self, digest: str, data: bytes, media_type: str) -> None:
        sha256, md5 = await self._run(_hashes, data)
        await self.client.put(self.key(digest), data, sha256, md5, media_type)

    def _track(self, digest: str, size: int, running: Deferred[None]) -> None:
        self._uploads[digest] = running

        def stored(_: object) -> None:
            self._metrics.storage_uploads.labels("stored").inc()
            self.quota.add(digest, size, self._reactor.seconds())
            log.info(
                "stored {digest} ({size} bytes) in the storage bucket", digest=digest, size=size
            )

        def failed(failure: Failure) -> None:
            self._metrics.storage_uploads.labels("failed").inc()
            log.warn(
                "{digest} not stored in the storage bucket: {error}",
                digest=digest,
                error=failure.getErrorMessage(),
            )

        def ended(_: object) -> None:
            del self._uploads[digest]
            self.quota.unreserve(size)
            self.quota.unpin(digest)

        running.addCallbacks(stored, failed).addBoth(ended)

    def remove(self, digest: str) -> bool:
        if digest in self._uploads or self.quota.pinned(digest):
            return False
        self._evict(digest, "as purged")
        return True

    def _evict(self, digest: str, why: str = "to keep its quota") -> None:
        log.info("removing {digest} from the storage bucket {why}", digest=digest, why=why)
        self._metrics.storage_evictions.inc()
        self.quota.forget(digest)
        Deferred.fromCoroutine(self.client.delete(self.key(digest))).addErrback(
            lambda f: log.warn(
                "cannot delete {digest} from the storage bucket: {error}",
                digest=digest,
                error=f.getErrorMessage(),
            )
        )

    def stats(self) -> dict[str, Any]:
        return {
            "bucket": self.client.bucket,
            "prefix": self.prefix,
            "objects": len(self.quota),
            "size": self.quota.size,
            "max_size": self.quota.max_size,
            "uploads": sorted(self._uploads),
        }


def _hashes(data: bytes) -> tuple[str, str]:
    md5 = hashlib.md5(data, usedforsecurity=False).digest()
    return hashlib.sha256(data).hexdigest(), base64.b64encode(md5).decode()
