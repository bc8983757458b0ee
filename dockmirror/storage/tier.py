"""An S3 bucket as the cache's second tier, shared by every node.

Objects are named by digest, ``<prefix>blobs/sha256/<hex>``, layers and
manifests alike, so that an operator can audit the bucket.  The quota
(``[storage] max_size``) is kept by LRU in the tier's records
(:class:`~dockmirror._interfaces.IStorageRecords`): on one node, over the
objects it recorded and those it finds listing the bucket at start (and
daily); in a cluster, in PostgreSQL, over the objects of every node, read or
stored by any (:mod:`dockmirror.cluster.storage`), and the bucket is listed
by one node a day, not by each node at its start: a listing costs one
request per 1000 objects.  A listing that failed is made again 5 minutes
later, then less and less often, hourly at most, until one ends well; the
failure is logged once, as is the first listing that ends well after it.
There, the records decide alone
whether the bucket holds a blob, and the cluster's fill claim covers the
upload, so that two nodes never upload one digest.  At start, and hourly,
incomplete multipart uploads older than ``stale_uploads`` (left by a node
that died mid-fill) are aborted; in a cluster, the node that takes a dead
node's claim over aborts them at once.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable
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
from dockmirror.ranged import content_range
from dockmirror.reference import HEX_LENGTH
from dockmirror.storage.quota import LISTING_INTERVAL, listing_delay
from dockmirror.storage.s3 import PRESIGN_EXPIRY, S3Client, S3Error
from dockmirror.storage.upload import PART_SIZE, BlobUpload
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
        #: Where the objects are recorded, for the quota; a cluster puts its own in before start.
        self.records = records
        self._reactor = reactor
        self._run = run
        self._metrics = metrics
        #: Uploads in progress, by digest.
        self._uploads: dict[str, Deferred[None]] = {}
        #: Objects clients were sent to, until their URLs expire.
        self._lent: dict[str, IDelayedCall] = {}
        #: Whether the records were said to be taken as they are, or a listing was made.
        self._trusted = False
        #: The next try of a listing that failed.
        self._relisting: IDelayedCall | None = None
        self._sweeper = LoopingCall(self._sweep_now)
        self._sweeper.clock = reactor

    def __repr__(self) -> str:
        return f"<S3Storage {self.client.bucket}/{self.prefix}: {self.records!r}>"

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
        self.records.load(objects)
        self._sweeper.start(SWEEP_INTERVAL, now=True).addErrback(
            lambda f: log.failure("the upload sweeper stopped", f)
        )

    def stop(self) -> Deferred[None]:
        if self._sweeper.running:
            self._sweeper.stop()
        if self._relisting is not None and self._relisting.active():
            self._relisting.cancel()
        for digest, lent in list(self._lent.items()):
            lent.cancel()
            self.records.release(digest)
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

    async def _list_if_due(self) -> None:
        """List the bucket if the records ask for it (see :meth:`IStorageRecords.listing_due`)."""
        failed = await self.records.listing_due()
        if failed is not None:
            self._trusted = True
            listing = Deferred.fromCoroutine(self._reconcile())
            await listing.addCallbacks(
                lambda _: self._listed(failed), lambda f: self._listing_failed(failed + 1, f)
            )
        elif not self._trusted:
            self._trusted = True
            stats = self.records.stats()
            log.info(
                "storage bucket {bucket}/{prefix}: taken as its records say, listed within"
                " {hours:.0f} hours; {count} blobs, {size} bytes",
                bucket=self.client.bucket,
                prefix=self.prefix,
                hours=LISTING_INTERVAL / 3600,
                count=stats["objects"],
                size=stats["size"],
            )

    async def _reconcile(self) -> None:
        """Learn what the bucket holds: objects found are recorded, objects gone forgotten."""
        since = self._reactor.seconds()
        found = {}
        for info in await self.client.list_objects(self.prefix + "blobs/"):
            digest = self.digest_of(info.key)
            if digest is not None:
                found[digest] = (info.size, info.modified)
        victims = await self.records.reconcile(found, since)
        stats = self.records.stats()
        log.info(
            "storage bucket {bucket}/{prefix}: {count} blobs, {size} bytes",
            bucket=self.client.bucket,
            prefix=self.prefix,
            count=stats["objects"],
            size=stats["size"],
        )
        for digest in victims:
            self._delete(digest, "to keep its quota")

    def _listed(self, failed: int) -> None:
        self.records.listed()
        if failed:
            log.info(
                "storage bucket {bucket} listed again, after {failed} failed listings",
                bucket=self.client.bucket,
                failed=failed,
            )

    def _listing_failed(self, failures: int, failure: Failure) -> None:
        """Try again after :func:`listing_delay`; say why the first time only, without a
        traceback for S3's answers."""
        delay = listing_delay(failures)
        if self._relisting is not None and self._relisting.active():
            self._relisting.cancel()
        self._relisting = self._reactor.callLater(delay, self._relist)
        if failures > 1:
            return
        again = (
            "listing it again in {minutes:.0f} minutes, then less often (hourly at most),"
            " without an error until it works"
        )
        if not failure.check(S3Error):
            log.failure("listing the storage bucket failed; " + again, failure, minutes=delay / 60)
            return
        log.error(
            "storage bucket {bucket} cannot be used now: {error}; blobs come from the upstreams;"
            " " + again,
            bucket=self.client.bucket,
            error=failure.getErrorMessage(),
            minutes=delay / 60,
        )

    def _relist(self) -> Deferred[None]:
        self._relisting = None
        return self._listing()

    def _listing(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._list_if_due()).addErrback(
            lambda f: log.failure("listing the storage bucket failed", f)
        )

    def _sweep_now(self) -> Deferred[Any]:
        """The hourly upkeep: a listing of the bucket if due, and the sweep of uploads."""
        listing = self._listing()
        sweeping = Deferred.fromCoroutine(self.sweep()).addErrback(
            lambda f: log.warn("sweeping incomplete uploads failed: {error}", error=f.value)
        )
        return DeferredList([listing, sweeping])

    async def sweep(self, key: str | None = None) -> int:
        """Abort incomplete uploads under the prefix older than ``stale_uploads``.

        With *key*, abort every incomplete upload of that object: in a cluster,
        the node that holds the object's claim, about to upload it, does so
        with what a node that held it before and died left.
        """
        ours = {self.key(digest) for digest in self._uploads}
        cutoff = self._reactor.seconds() - self.stale_uploads
        aborted = 0
        for upload in await self.client.list_uploads(key or self.prefix + "blobs/"):
            if key is None and (upload.initiated > cutoff or upload.key in ours):
                continue
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

    async def _lease(self, digest: str) -> bool:
        """Take a lease on *digest* for reading; False (and none) if it is known to be absent."""
        recorded = await self.records.lease(digest)
        if recorded is None and self.records.shared:
            self.records.release(digest)
            return False
        return True

    async def _open(self, digest: str, size: int, start: int, end: int | None) -> IResponse | None:
        if not await self._lease(digest):
            return None
        whole = start == 0 and end in (None, size)
        try:
            response = await self.client.get(
                self.key(digest), *((0, None) if whole else (start, end))
            )
        except S3Error as e:
            self.records.release(digest)
            self._unavailable(digest, e)
            return None
        if response is None:
            self.records.release(digest)
            self.records.forget(digest)
            return None
        end = size if end is None else end
        if response.length not in (end - start, UNKNOWN_LENGTH):
            self.records.release(digest)
            discard(response)
            log.warn(
                "stored {digest} is {length} bytes, not {size}: fetched from the upstream",
                digest=digest,
                length=response.length,
                size=size,
            )
            return None
        if not whole and (response.code != 206 or content_range(response) != (start, end, size)):
            # Other bytes than those asked for (a 200 of the whole object, chunked,
            # or another range) would be served as the range, unverified.
            self.records.release(digest)
            discard(response)
            log.warn(
                "the storage bucket answered {code} to bytes {start}-{last} of {digest}",
                code=response.code,
                start=start,
                last=end - 1,
                digest=digest,
            )
            return None
        self.records.found(digest, size)
        return response

    def read_small(self, digest: str, limit: int) -> Deferred[tuple[bytes, str | None] | None]:
        return Deferred.fromCoroutine(self._read_small(digest, limit))

    async def _read_small(self, digest: str, limit: int) -> tuple[bytes, str | None] | None:
        if not await self._lease(digest):
            return None
        try:
            response = await self.client.get(self.key(digest))
            if response is None:
                self.records.forget(digest)
                return None
            if response.length != UNKNOWN_LENGTH and response.length > limit:
                discard(response)
                return None
            body = await self.client.read(response, limit)
        except S3Error as e:
            self._unavailable(digest, e)
            return None
        finally:
            self.records.release(digest)
        self.records.found(digest, len(body))
        types = response.headers.getRawHeaders("content-type") or [None]
        return body, types[0]

    def release(self, digest: str, outcome: Any) -> None:
        self.records.release(digest)
        error = outcome.value if isinstance(outcome, Failure) else outcome
        if isinstance(error, DigestMismatch):
            log.error("stored {digest} does not match its digest: removed", digest=digest)
            self._evict(digest, "it is corrupt")

    def location(self, digest: str) -> Deferred[str | None]:
        return Deferred.fromCoroutine(self._location(digest))

    async def _location(self, digest: str) -> str | None:
        if not await self._lease(digest):
            return None
        key = self.key(digest)
        try:
            size = await self.client.head(key)
            if size is None:
                self.records.release(digest)
                self.records.forget(digest)
                return None
            url = await self.client.presign(key, PRESIGN_EXPIRY)
        except S3Error as e:
            self.records.release(digest)
            self._unavailable(digest, e)
            return None
        self.records.found(digest, size)
        self._lend(digest)
        return url

    def _lend(self, digest: str) -> None:
        """Keep the lease just taken on *digest* while a presigned URL to it is valid."""
        lent = self._lent.get(digest)
        if lent is not None:
            lent.reset(PRESIGN_EXPIRY)
            self.records.release(digest)  # one lease per object lent is enough
            return

        def expired() -> None:
            del self._lent[digest]
            self.records.release(digest)

        self._lent[digest] = self._reactor.callLater(PRESIGN_EXPIRY, expired)

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
        if digest in self._uploads:
            return
        upload = BlobUpload(self.client, self.key(digest), progress, self._run)
        upload.attach()  # now: the file is renamed once the fill is verified

        async def store() -> None:
            if self.records.shared and size >= PART_SIZE:
                try:
                    await self.sweep(upload.key)  # what a dead holder of the claim left
                except S3Error as e:
                    log.warn("cannot sweep uploads of {digest}: {error}", digest=digest, error=e)
            await upload.run()

        self._store(digest, size, store, upload.close)

    def put(self, digest: str, data: bytes, media_type: str) -> None:
        if digest in self._uploads:
            return

        async def store() -> None:
            sha256, md5 = await self._run(_hashes, data)
            await self.client.put(self.key(digest), data, sha256, md5, media_type)

        self._store(digest, len(data), store)

    def _store(
        self,
        digest: str,
        size: int,
        store: Callable[[], Awaitable[None]],
        skipped: Callable[[], None] | None = None,
    ) -> None:
        """Reserve room for *digest*, then *store* it; *skipped* is called if it is not."""
        running = Deferred.fromCoroutine(self._reserve_and_store(digest, size, store, skipped))
        self._uploads[digest] = running

        def ended(_: object) -> None:
            if self._uploads.get(digest) is running:
                del self._uploads[digest]

        running.addBoth(ended)

    async def _reserve_and_store(
        self,
        digest: str,
        size: int,
        store: Callable[[], Awaitable[None]],
        skipped: Callable[[], None] | None,
    ) -> None:
        reserved = await self.records.reserve(digest, size)
        if isinstance(reserved, str):
            if skipped is not None:
                skipped()
            log.info(
                "{digest} ({size} bytes) not stored: {why}", digest=digest, size=size, why=reserved
            )
            return
        for victim in reserved:
            self._delete(victim, "to keep its quota")
        try:
            await store()
        except BaseException as e:
            self.records.uploaded(digest, size, False)
            self._metrics.storage_uploads.labels("failed").inc()
            log.warn(
                "{digest} not stored in the storage bucket: {error}",
                digest=digest,
                error=str(e) or type(e).__name__,
            )
            if not isinstance(e, Exception):
                raise
            return
        self.records.uploaded(digest, size, True)
        self._metrics.storage_uploads.labels("stored").inc()
        log.info("stored {digest} ({size} bytes) in the storage bucket", digest=digest, size=size)

    def remove(self, digest: str) -> bool:
        if digest in self._uploads or self.records.in_use(digest):
            return False

        def removable(yes: bool) -> None:
            if yes:
                self._delete(digest, "as purged")
            else:
                log.info("{digest} stays in the storage bucket: in use", digest=digest)

        self.records.remove(digest).addCallback(removable)
        return True

    def _evict(self, digest: str, why: str) -> None:
        self.records.forget(digest)
        self._delete(digest, why, chosen=False)

    def _delete(self, digest: str, why: str, chosen: bool = True) -> None:
        """Delete *digest* from the bucket; *chosen* by the records, which hear of the end."""
        log.info("removing {digest} from the storage bucket {why}", digest=digest, why=why)
        self._metrics.storage_evictions.inc()
        d = Deferred.fromCoroutine(self.client.delete(self.key(digest)))
        d.addErrback(
            lambda f: log.warn(
                "cannot delete {digest} from the storage bucket: {error}",
                digest=digest,
                error=f.getErrorMessage(),
            )
        )
        if chosen:
            d.addBoth(lambda _: self.records.evicted(digest))

    def stats(self) -> dict[str, Any]:
        return {
            "bucket": self.client.bucket,
            "prefix": self.prefix,
            **self.records.stats(),
            "max_size": self.records.max_size,
            "uploads": sorted(self._uploads),
        }


def _hashes(data: bytes) -> tuple[str, str]:
    md5 = hashlib.md5(data, usedforsecurity=False).digest()
    return hashlib.sha256(data).hexdigest(), base64.b64encode(md5).decode()
