"""The S3 client of :mod:`dockmirror.storage.s3` against a real Ceph RADOS Gateway."""

from __future__ import annotations

import base64
import hashlib
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import reactor

from dockmirror.config import StorageConfig
from dockmirror.storage.s3 import S3Client, S3Error

from .ceph import S3Bucket


def client_for(s3: S3Bucket, **overrides: object) -> S3Client:
    table = {k: v for k, v in s3.storage_table().items() if k != "backend"}
    return S3Client(StorageConfig(backend="s3", **{**table, **overrides}), reactor)  # type: ignore[arg-type]


def hashes(data: bytes) -> tuple[str, str]:
    return hashlib.sha256(data).hexdigest(), base64.b64encode(hashlib.md5(data).digest()).decode()


async def body_of(response) -> bytes:
    import treq

    return await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_put_head_get_range_delete(s3):
    client = client_for(s3)
    try:
        data = bytes(range(256)) * 100
        await client.put("p/blobs/sha256/aa", data, *hashes(data))
        assert await client.head("p/blobs/sha256/aa") == len(data)
        assert await client.head("p/blobs/sha256/missing") is None
        assert await body_of(await client.get("p/blobs/sha256/aa")) == data
        part = await client.get("p/blobs/sha256/aa", 10, 20)
        assert part.code == 206 and await body_of(part) == data[10:20]
        assert await client.get("p/blobs/sha256/missing") is None
        [info] = await client.list_objects("p/blobs/")
        assert (info.key, info.size) == ("p/blobs/sha256/aa", len(data))
        url = await client.presign("p/blobs/sha256/aa")
        with urllib.request.urlopen(url) as answer:  # no credentials but the URL's
            assert answer.read() == data
        await client.delete("p/blobs/sha256/aa")
        assert await client.head("p/blobs/sha256/aa") is None
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_multipart_upload_and_abort(s3):
    client = client_for(s3)
    try:
        parts = [b"a" * (5 << 20), b"b" * 1000]
        upload = await client.create_upload("blobs/sha256/mp")
        etags = [
            await client.upload_part("blobs/sha256/mp", upload, n, part, *hashes(part))
            for n, part in enumerate(parts, 1)
        ]
        [pending] = await client.list_uploads("blobs/")
        assert (pending.key, pending.upload_id) == ("blobs/sha256/mp", upload)
        await client.complete_upload("blobs/sha256/mp", upload, etags)
        assert await client.head("blobs/sha256/mp") == sum(map(len, parts))
        assert await client.list_uploads("blobs/") == []
        other = await client.create_upload("blobs/sha256/cut")
        await client.upload_part("blobs/sha256/cut", other, 1, parts[1], *hashes(parts[1]))
        await client.abort_upload("blobs/sha256/cut", other)
        assert await client.list_uploads("blobs/") == []
        assert await client.head("blobs/sha256/cut") is None
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_wrong_keys_and_unreachable_endpoint_raise(s3):
    wrong = client_for(s3, secret_key="not-the-secret")
    gone = client_for(s3, endpoint="http://127.0.0.1:9")
    try:
        with pytest.raises(S3Error) as refused:
            await wrong.head("blobs/sha256/x")
        assert refused.value.status == 403 and not refused.value.transient
        with pytest.raises(S3Error) as unreachable:
            await gone.head("blobs/sha256/x")
        assert unreachable.value.transient
    finally:
        await wrong.close()
        await gone.close()
