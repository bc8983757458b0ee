"""A blob copied into the bucket while its fill writes it to the local temporary file.

The upload reads what the fill wrote back from the file, one part at a time,
so it holds at most one part in memory and never slows the fill or its
readers: a bucket slower than the upstream only makes the upload finish
later.  It hashes what it sends, and completes only once the fill verified
the blob and its own hash matches too.  A fill that fails aborts it; a
node that dies leaves an incomplete upload that a sweep aborts later.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dockmirror.cache.index import Runner
from dockmirror.cache.progress import FillProgress
from dockmirror.storage.s3 import S3Client, S3Error

log = Logger()

#: Bytes of each part of a multipart upload but the last (S3 asks for 5 MiB at least);
#: a blob smaller than this is stored with a single PUT.
PART_SIZE = 8 << 20
#: The most parts one upload may have (S3's limit).
MAX_PARTS = 10_000


class UploadError(Exception):
    """The blob could not be stored whole and verified."""


def part_size(size: int) -> int:
    """The part size for a blob of *size* bytes: whole MiB, within S3's part count."""
    needed = -(-size // MAX_PARTS)
    return max(PART_SIZE, -(-needed // (1 << 20)) * (1 << 20))


class BlobUpload:
    """Copies the blob that *fill* writes into the object *key*."""

    def __init__(self, client: S3Client, key: str, fill: FillProgress, run: Runner) -> None:
        self._client = client
        self.key = key
        self._fill = fill
        self._run = run
        self._fd: int | None = None
        self._closed = False
        self.sent = 0
        self._hash = hashlib.new(fill.digest.partition(":")[0])

    def __repr__(self) -> str:
        return f"<BlobUpload {self.key} {self.sent}/{self._fill.size}>"

    def attach(self) -> None:
        """Open the fill's file as soon as it exists (before any rename can move it)."""
        self._fill.ready.wait().addCallbacks(self._open, lambda _: None)

    def close(self) -> None:
        """Give up before :meth:`run`: the file is not read."""
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, _: object) -> None:
        if self._closed:
            return
        try:
            self._fd = os.open(self._fill.temp_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warn("cannot read {path}: {error}", path=self._fill.temp_path, error=e.strerror)

    async def run(self) -> None:
        """Store the blob; raises :class:`UploadError` (or an S3 error) if it is not."""
        try:
            await self._fill.ready.wait()
            if self._fd is None:
                raise UploadError("the fill's file could not be opened")
            if self._fill.size < PART_SIZE:
                await self._single()
            else:
                await self._multipart()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    async def _single(self) -> None:
        size = self._fill.size
        await self._written(size)
        await self._verified()
        data, sha256, md5 = await self._read(0, size)
        self._check_digest()
        await self._client.put(self.key, data, sha256, md5)
        self.sent = size

    async def _multipart(self) -> None:
        size = self._fill.size
        step = part_size(size)
        upload_id = await self._client.create_upload(self.key)
        try:
            etags = []
            for number, offset in enumerate(range(0, size, step), 1):
                count = min(step, size - offset)
                await self._written(offset + count)
                data, sha256, md5 = await self._read(offset, count)
                etags.append(
                    await self._client.upload_part(self.key, upload_id, number, data, sha256, md5)
                )
                del data
                self.sent = offset + count
            await self._verified()
            self._check_digest()
            await self._client.complete_upload(self.key, upload_id, etags)
        except BaseException:
            try:
                await self._client.abort_upload(self.key, upload_id)
            except S3Error as e:
                log.warn(
                    "cannot abort the upload of {key} ({error}): a sweep will",
                    key=self.key,
                    error=str(e),
                )
            raise

    async def _read(self, offset: int, count: int) -> tuple[bytes, str, str]:
        assert self._fd is not None
        data, sha256, md5 = await self._run(_read_part, self._fd, offset, count, self._hash)
        if len(data) != count:
            raise UploadError(f"the fill's file ended at {offset + len(data)}")
        return data, sha256, md5

    def _check_digest(self) -> None:
        actual = f"{self._hash.name}:{self._hash.hexdigest()}"
        if actual != self._fill.digest:
            raise UploadError(f"the bytes read back hash to {actual}")

    def _written(self, offset: int) -> Deferred[None]:
        """Fires once the fill wrote *offset* bytes; fails if it fails first."""
        return self._until(lambda fill: fill.written >= offset or fill.verified)

    def _verified(self) -> Deferred[None]:
        return self._until(lambda fill: fill.verified)

    def _until(self, condition: Any) -> Deferred[None]:
        fill = self._fill
        done: Deferred[None] = Deferred(lambda _: fill.unsubscribe(check))

        def check() -> None:
            if done.called:
                return
            if condition(fill):
                fill.unsubscribe(check)
                done.callback(None)
            elif fill.error is not None:
                fill.unsubscribe(check)
                done.errback(UploadError(f"the fill failed: {fill.error}"))

        fill.subscribe(check)
        check()
        return done


def _read_part(fd: int, offset: int, count: int, hasher: Any) -> tuple[bytes, str, str]:
    """Bytes [offset, offset + count) of *fd*, hashed (in a worker thread).

    *hasher* takes the blob's bytes in order, part after part; the part's own
    SHA-256 (the request's payload hash) and MD5 (``Content-MD5``) come back
    with it.
    """
    pieces = []
    position, end = offset, offset + count
    while position < end:
        piece = os.pread(fd, end - position, position)
        if not piece:
            break
        pieces.append(piece)
        position += len(piece)
    data = b"".join(pieces)
    hasher.update(data)
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
    return data, hashlib.sha256(data).hexdigest(), md5
