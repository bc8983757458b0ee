"""The storage tier's parts in memory: the quota, object keys, addressing, the upload of a fill."""

from __future__ import annotations

import hashlib
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from dockmirror._interfaces import IBlobStorage, IStorageRecords
from dockmirror.cache.progress import FillProgress
from dockmirror.config import ConfigError, StorageConfig, load
from dockmirror.metrics import Metrics
from dockmirror.storage import s3
from dockmirror.storage.quota import LISTING_INTERVAL, LISTING_RETRY_MAX, Quota
from dockmirror.storage.s3 import ObjectInfo, S3Client, S3Error
from dockmirror.storage.tier import SWEEP_INTERVAL, S3Storage
from dockmirror.storage.upload import MAX_PARTS, PART_SIZE, BlobUpload, UploadError, part_size


class Records:
    """The SQLite rows a quota writes."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, float]] = {}

    def record(self, digest: str, size: int, used: float) -> None:
        self.rows[digest] = (size, used)

    def touch(self, digest: str, used: float) -> None:
        if digest in self.rows:
            self.rows[digest] = (self.rows[digest][0], used)

    def remove(self, digest: str) -> None:
        self.rows.pop(digest, None)


def run_now(f: Any, *args: Any) -> Deferred[Any]:
    return succeed(f(*args))


def storage_config(**overrides: Any) -> StorageConfig:
    table = {
        "backend": "s3",
        "endpoint": "http://127.0.0.1:7480",
        "bucket": "mirror",
        "access_key": "AK",
        "secret_key": "SK",
        **overrides,
    }
    return StorageConfig(**table)


# --- the quota --------------------------------------------------------------------


def quota(records: Records, max_size: int | None) -> tuple[Quota, MemoryReactorClock]:
    clock = MemoryReactorClock()
    return Quota(records, max_size, clock), clock  # type: ignore[arg-type]


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_quota_evicts_least_recently_used_objects_not_in_use():
    records = Records()
    rows = [("b", 100, 2.0), ("a", 100, 1.0), ("c", 100, 3.0)]
    records.rows = {digest: (size, used) for digest, size, used in rows}
    kept, clock = quota(records, max_size=300)
    assert verifyObject(IStorageRecords, kept)
    kept.load(rows)
    assert list(kept._objects) == ["a", "b", "c"] and kept.size == 300
    clock.advance(4.0)
    assert result_of(kept.lease("a")) == 100
    kept.release("a")
    assert result_of(kept.lease("b")) == 100  # read now
    assert result_of(kept.reserve("d", 100)) == ["c"]
    assert kept.size == 200 and kept.reserved == 100 and kept.in_use("d")
    assert isinstance(result_of(kept.reserve("e", 250)), str)  # b and d are in use
    kept.release("b")
    assert kept.victims(100) == ["a"]  # b was read after a
    clock.advance(1.0)
    kept.uploaded("d", 100, True)
    assert records.rows["d"] == (100, 5.0) and "c" not in records.rows
    assert kept.reserved == 0 and not kept.in_use("d")
    assert result_of(kept.reserve("d", 100)) == "stored already"
    assert result_of(kept.lease("x")) is None


def test_quota_without_a_maximum_evicts_nothing():
    kept, _ = quota(Records(), max_size=None)
    kept.add("a", 10**15, 0.0)
    assert result_of(kept.reserve("b", 10**15)) == []


def test_a_listing_of_the_bucket_adds_and_forgets_objects_but_not_those_stored_meanwhile():
    kept, clock = quota(Records(), max_size=250)
    kept.load([("gone", 100, 1.0), ("read", 100, 2.0)])
    clock.advance(10.0)
    kept.add("new", 50, 10.0)  # stored while the bucket was listed from 5.0 on
    kept.lease("read")
    victims = result_of(kept.reconcile({"found": (100, 3.0)}, since=5.0))
    assert victims == []
    assert set(kept._objects) == {"read", "new", "found"} and kept.size == 250
    kept.release("read")
    assert result_of(kept.reconcile({"found": (100, 3.0), "read": (100, 2.0)}, since=20.0)) == []
    assert set(kept._objects) == {"read", "found"} and kept.size == 200
    kept.max_size = 150
    assert result_of(kept.reconcile({"found": (100, 3.0), "read": (100, 2.0)}, since=30.0)) == [
        "read"
    ]


def test_part_size_stays_within_the_part_count():
    assert part_size(1) == PART_SIZE
    assert part_size(PART_SIZE * MAX_PARTS) == PART_SIZE
    big = 200 << 30
    assert part_size(big) * MAX_PARTS >= big and part_size(big) % (1 << 20) == 0


# --- keys and addressing ------------------------------------------------------------


def test_object_keys_name_the_digest_and_nothing_else_is_taken_for_one():
    storage = S3Storage(
        storage_config(prefix="m/"),
        MemoryReactorClock(),
        run_now,
        quota(Records(), None)[0],
        Metrics(),
    )
    assert verifyObject(IBlobStorage, storage)
    digest = "sha256:" + "ab" * 32
    assert storage.key(digest) == "m/blobs/sha256/" + "ab" * 32
    assert storage.digest_of(storage.key(digest)) == digest
    for key in (
        "m/blobs/sha256/" + "AB" * 32,
        "m/blobs/sha256/" + "ab" * 31,
        "m/blobs/md5/" + "ab" * 16,
        "m/blobs/sha256/../" + "ab" * 32,
        "other/blobs/sha256/" + "ab" * 32,
        "sha256/" + "ab" * 32,
        "m/sha256/" + "ab" * 32,
    ):
        assert storage.digest_of(key) is None, key


def test_path_and_virtual_host_addressing():
    reactor = MemoryReactorClock()
    path = S3Client(storage_config(), reactor)
    assert path.url("blobs/sha256/ab") == "http://127.0.0.1:7480/mirror/blobs/sha256/ab"
    assert path.url(query={"uploads": ""}) == "http://127.0.0.1:7480/mirror/?uploads="
    virtual = S3Client(storage_config(endpoint=None, region="eu-west-1"), reactor)
    assert virtual.url("k") == "https://mirror.s3.eu-west-1.amazonaws.com/k"
    assert virtual.url("a b+c") == "https://mirror.s3.eu-west-1.amazonaws.com/a%20b%2Bc"


@pytest.mark.parametrize(
    ("endpoint", "bucket", "url"),
    [
        (None, "mirror", "https://mirror.s3.us-east-1.amazonaws.com/k"),
        (
            "https://s3.eu-west-1.amazonaws.com",
            "mirror",
            "https://mirror.s3.eu-west-1.amazonaws.com/k",
        ),
        (
            "https://s3.cn-north-1.amazonaws.com.cn",
            "mirror",
            "https://mirror.s3.cn-north-1.amazonaws.com.cn/k",
        ),
        # A dot would make a host name that AWS's certificate does not match.
        (None, "my.mirror", "https://s3.us-east-1.amazonaws.com/my.mirror/k"),
        ("https://minio.corp.example:9000", "mirror", "https://minio.corp.example:9000/mirror/k"),
        ("http://127.0.0.1:7480", "mirror", "http://127.0.0.1:7480/mirror/k"),
        (
            "https://s3.amazonaws.com.evil.example",
            "mirror",
            "https://s3.amazonaws.com.evil.example/mirror/k",
        ),
    ],
)
def test_virtual_hosts_on_aws_path_style_elsewhere_by_default(endpoint, bucket, url):
    config = storage_config(endpoint=endpoint, bucket=bucket)
    assert S3Client(config, MemoryReactorClock()).url("k") == url


def test_addressing_when_told():
    reactor = MemoryReactorClock()
    virtual = storage_config(endpoint="https://rgw.corp.example", addressing="virtual")
    assert S3Client(virtual, reactor).url("k") == "https://mirror.rgw.corp.example/k"
    path = storage_config(endpoint=None, addressing="path")
    assert S3Client(path, reactor).url("k") == "https://s3.us-east-1.amazonaws.com/mirror/k"


def _storage_toml(tmp_path, **keys: str) -> str:
    path = tmp_path / "dockmirror.toml"
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in keys.items()]
    path.write_text('[storage]\nbackend = "s3"\n' + "\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("bucket", "why"),
    [
        ("ab", "not an S3 bucket name"),
        ("a" * 64, "not an S3 bucket name"),
        ("Mirror", "not an S3 bucket name"),
        ("mir_ror", "not an S3 bucket name"),
        ("a..b", "not an S3 bucket name"),
        ("a.-b", "not an S3 bucket name"),
        ("a-.b", "not an S3 bucket name"),
        ("-ab", "not an S3 bucket name"),
        ("xn--mirror", "not an S3 bucket name"),
        ("mirror-s3alias", "not an S3 bucket name"),
        ("192.168.5.4", "formatted as an IP address"),
    ],
)
def test_bucket_names_follow_s3s_grammar(tmp_path, bucket, why):
    with pytest.raises(ConfigError, match=f"storage.bucket .*{why}"):
        load(_storage_toml(tmp_path, bucket=bucket, addressing="path"))
    with pytest.raises(ValueError, match=why):
        S3Client(storage_config(bucket=bucket, addressing="path"), MemoryReactorClock())


def test_a_virtual_host_bucket_must_make_a_host_name_the_certificate_matches(tmp_path):
    for endpoint, bucket, why in (
        ("http://127.0.0.1:7480", "mirror", "the endpoint must be a host name"),
        ("https://[::1]:7480", "mirror", "the endpoint must be a host name"),
        ("https://rgw.corp.example", "my.mirror", "would not match the endpoint's certificate"),
    ):
        keys = {"bucket": bucket, "endpoint": endpoint, "addressing": "virtual"}
        with pytest.raises(ConfigError, match=f"storage.bucket .*{why}"):
            load(_storage_toml(tmp_path, **keys))
        with pytest.raises(ValueError, match=why):
            S3Client(storage_config(**keys), MemoryReactorClock())
    # Over plain http, a dotted bucket is only more labels.
    config = storage_config(
        endpoint="http://rgw.corp.example", bucket="my.mirror", addressing="virtual"
    )
    assert S3Client(config, MemoryReactorClock()).url("k") == "http://my.mirror.rgw.corp.example/k"


def test_the_endpoints_ca_client_certificate_and_proxy_are_checked(tmp_path):
    absent = str(tmp_path / "absent.pem")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for keys, error in (
        ({"ca": absent}, "storage.ca: .*absent.pem: cannot read"),
        ({"ca": str(not_pem)}, "storage.ca: .*not.pem: no PEM certificate found"),
        ({"client_cert": str(not_pem)}, "storage.client_cert: client_cert and client_key go"),
        ({"proxy": "https://proxy.corp:3128"}, "storage.proxy.*must be an http:// URL"),
        ({"proxy": "http://proxy.corp:3128", "proxy_username": "u"}, "proxy_password go"),
        ({"no_proxy": ["corp.example"]}, "storage: proxy_username and no_proxy need a proxy"),
    ):
        with pytest.raises(ConfigError, match=error):
            load(_storage_toml(tmp_path, bucket="mirror", **keys))  # type: ignore[arg-type]
    config = load(
        _storage_toml(tmp_path, bucket="mirror", proxy="http://u:pw@proxy.corp:3128")
    ).storage
    assert "pw" not in repr(config)


@pytest.mark.parametrize("addressing", ["path", "virtual"])
def test_presigned_urls_are_short_lived(addressing):
    endpoint = "http://s3.example.test:7480"
    client = S3Client(
        storage_config(addressing=addressing, endpoint=endpoint), MemoryReactorClock()
    )
    url = client.presign("blobs/sha256/ab")
    result: list[str] = []
    Deferred.fromCoroutine(url).addCallback(result.append)
    [signed] = result
    query = parse_qs(urlsplit(signed).query)
    assert query["X-Amz-Expires"] == ["300"]
    assert query["X-Amz-Credential"][0].startswith("AK/")
    assert "X-Amz-Signature" in query
    assert "SK" not in signed


# --- the upload of a fill ------------------------------------------------------------


class FakeS3:
    """Records the calls an upload makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.parts: list[bytes] = []

    async def put(self, key: str, data: bytes, sha256: str, md5: str) -> None:
        assert hashlib.sha256(data).hexdigest() == sha256
        self.calls.append(("put", key, len(data)))

    async def create_upload(self, key: str) -> str:
        self.calls.append(("create", key))
        return "U"

    async def upload_part(self, key, upload_id, number, data, sha256, md5) -> str:
        assert hashlib.sha256(data).hexdigest() == sha256
        self.calls.append(("part", number, len(data)))
        self.parts.append(data)
        return f'"{number}"'

    async def complete_upload(self, key, upload_id, etags) -> None:
        self.calls.append(("complete", etags))

    async def abort_upload(self, key, upload_id) -> None:
        self.calls.append(("abort", upload_id))


class Progress(FillProgress):
    """A fill written by the test, a slice at a time."""

    def __init__(self, path: str, data: bytes, digest: str | None = None) -> None:
        super().__init__(digest or "sha256:" + hashlib.sha256(data).hexdigest(), len(data), path)
        self.data = data
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self.ready.fire(None)

    def write(self, count: int) -> None:
        os.pwrite(self._fd, self.data[self.written : self.written + count], self.written)
        self.written += count
        self._notify()

    def verify(self) -> None:
        self.verified = True
        self._notify()

    def fail(self) -> None:
        self.error = RuntimeError("upstream cut")
        self._notify()


def start_upload(tmp_path, data: bytes, digest: str | None = None):
    fill = Progress(str(tmp_path / "fill"), data, digest)
    s3 = FakeS3()
    upload = BlobUpload(s3, "blobs/sha256/x", fill, run_now)  # type: ignore[arg-type]
    upload.attach()
    done = Deferred.fromCoroutine(upload.run())
    return fill, s3, done


def test_parts_are_sent_as_the_fill_writes_them_and_completed_once_verified(tmp_path):
    data = os.urandom(PART_SIZE * 2 + 1000)
    fill, s3, done = start_upload(tmp_path, data)
    assert s3.calls == [("create", "blobs/sha256/x")]
    fill.write(PART_SIZE - 1)
    assert len(s3.calls) == 1  # not a whole part yet
    fill.write(1)
    assert s3.calls[1:] == [("part", 1, PART_SIZE)]
    fill.write(PART_SIZE + 999)
    assert s3.calls[2:] == [("part", 2, PART_SIZE)]
    fill.write(1)
    assert s3.calls[3:] == [("part", 3, 1000)]
    assert not done.called  # not verified yet
    fill.verify()
    assert s3.calls[4:] == [("complete", ['"1"', '"2"', '"3"'])]
    assert done.called and b"".join(s3.parts) == data


def test_a_failed_fill_aborts_the_upload(tmp_path):
    fill, s3, done = start_upload(tmp_path, os.urandom(PART_SIZE + 10))
    fill.write(PART_SIZE)
    fill.fail()
    assert s3.calls[-1] == ("abort", "U")
    failures: list[Any] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(UploadError)


def test_bytes_read_back_that_do_not_match_are_never_completed(tmp_path):
    data = os.urandom(PART_SIZE + 10)
    fill, s3, done = start_upload(tmp_path, data, digest="sha256:" + "0" * 64)
    fill.write(len(data))
    fill.verify()  # as a fill would not, but the upload checks for itself
    assert ("abort", "U") in s3.calls and not any(c[0] == "complete" for c in s3.calls)
    done.addErrback(lambda f: f.trap(UploadError))


def test_a_small_blob_is_one_put_after_verification(tmp_path):
    fill, s3, done = start_upload(tmp_path, b"manifest")
    fill.write(8)
    assert s3.calls == []
    fill.verify()
    assert s3.calls == [("put", "blobs/sha256/x", 8)] and done.called


def test_stale_uploads_is_a_duration(tmp_path):
    path = tmp_path / "dockmirror.toml"
    table = '[storage]\nbackend = "s3"\nbucket = "mirror"\n'
    path.write_text(table + 'stale_uploads = "2h"\n')
    assert load(str(path)).storage.stale_uploads_seconds == 7200
    path.write_text(table + 'stale_uploads = "soon"\n')
    with pytest.raises(ConfigError, match="storage.stale_uploads"):
        load(str(path))


class Bucket:
    """The calls of an S3 client that the tier makes to serve redirects and deletes."""

    bucket = "mirror"

    def __init__(self) -> None:
        self.deleted: list[str] = []

    async def head(self, key: str) -> int:
        return 100

    async def presign(self, key: str, expires: int) -> str:
        return f"http://s3/{key}?X-Amz-Expires={expires}"

    async def delete(self, key: str) -> None:
        self.deleted.append(key)


def test_an_object_clients_were_sent_to_stays_until_their_urls_expire():
    reactor = MemoryReactorClock()
    bucket = Bucket()
    metrics = Metrics()
    storage = S3Storage(
        storage_config(max_size="150B"),
        reactor,
        run_now,
        Quota(Records(), 150, reactor),  # type: ignore[arg-type]
        metrics,
        client=bucket,  # type: ignore[arg-type]
    )
    digest = "sha256:" + "ab" * 32
    urls: list[str | None] = []
    storage.location(digest).addCallback(urls.append)
    assert urls == [f"http://s3/blobs/sha256/{'ab' * 32}?X-Amz-Expires=300"]
    assert isinstance(result_of(storage.records.reserve("sha256:" + "cd" * 32, 100)), str)
    assert not storage.remove(digest)
    reactor.advance(200)
    storage.location(digest).addCallback(urls.append)  # another client, later
    reactor.advance(200)
    assert storage.records.in_use(digest)
    reactor.advance(100)
    assert not storage.records.in_use(digest)
    assert storage.remove(digest)
    assert bucket.deleted == [f"blobs/sha256/{'ab' * 32}"]
    assert metrics.registry.get_sample_value("dockmirror_storage_evictions_total") == 1
    assert reactor.getDelayedCalls() == []


class Listed(Bucket):
    """A bucket that counts its listings."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0

    async def list_objects(self, prefix: str) -> list[ObjectInfo]:
        self.listings += 1
        return [ObjectInfo(f"{prefix}sha256/{'ab' * 32}", 100, 1.0)]

    async def list_uploads(self, prefix: str) -> list[Any]:
        return []


def listed(quota: Quota, reactor: MemoryReactorClock) -> tuple[S3Storage, Listed]:
    """A storage tier started over a bucket that counts its listings."""
    bucket = Listed()
    storage = S3Storage(
        storage_config(),
        reactor,
        run_now,
        quota,
        Metrics(),
        client=bucket,  # type: ignore[arg-type]
    )
    storage.start([])
    return storage, bucket


def test_the_bucket_is_listed_at_start_and_daily_only_when_the_records_say(monkeypatch):
    """Listing is paid per 1000 objects: one node lists at start, then daily (the hourly
    upkeep asks); a cluster's records make it once a day for all nodes."""
    reactor = MemoryReactorClock()
    quota = Quota(Records(), None, reactor)  # type: ignore[arg-type]
    storage, bucket = listed(quota, reactor)
    assert bucket.listings == 1
    assert quota.stats() == {"objects": 1, "size": 100}
    reactor.advance(SWEEP_INTERVAL)
    assert bucket.listings == 1
    reactor.advance(LISTING_INTERVAL)
    assert bucket.listings == 2
    storage.stop()
    # Records that say another node listed it lately: trusted, not listed.
    monkeypatch.setattr(quota, "listing_due", lambda: succeed(None))
    storage, trusted = listed(quota, reactor)
    reactor.advance(SWEEP_INTERVAL)
    assert trusted.listings == 0
    storage.stop()


class Unlisted(Listed):
    """A bucket whose listings fail until told otherwise."""

    failing = True

    async def list_objects(self, prefix: str) -> list[ObjectInfo]:
        if self.failing:
            self.listings += 1
            raise S3Error("listing blobs/: 503 Slow Down", 503)
        return await super().list_objects(prefix)


def test_a_failed_listing_is_made_again_in_minutes_then_less_often_and_logged_once():
    reactor = MemoryReactorClock()
    quota = Quota(Records(), None, reactor)  # type: ignore[arg-type]
    bucket = Unlisted()
    storage = S3Storage(storage_config(), reactor, run_now, quota, Metrics(), client=bucket)  # type: ignore[arg-type]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        storage.start([])  # the first listing fails
        tries = []
        for _ in range(7 * 12):  # seven hours, five minutes at a time
            reactor.advance(300)
            tries.append(bucket.listings)
        bucket.failing = False
        reactor.advance(LISTING_RETRY_MAX)
        listed = bucket.listings
        reactor.advance(LISTING_INTERVAL - 2 * LISTING_RETRY_MAX)
        assert bucket.listings == listed  # daily again
        reactor.advance(2 * LISTING_RETRY_MAX)
        assert bucket.listings == listed + 1
    finally:
        globalLogPublisher.removeObserver(events.append)
        storage.stop()
    # After 5, 10, 20 and 40 minutes, then hourly (the hourly upkeep finds none due).
    minutes = [5 * (i + 1) for i, n in enumerate(tries) if n > ([1, *tries])[i]]
    assert minutes[:6] == [5, 15, 35, 75, 135, 195]
    said = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.info]
    errors = [line for line in said if "cannot be used now" in line]
    assert errors == [
        "storage bucket mirror cannot be used now: listing blobs/: 503 Slow Down; blobs come"
        " from the upstreams; listing it again in 5 minutes, then less often (hourly at most),"
        " without an error until it works"
    ]
    assert sum("listed again, after" in line for line in said) == 1
    assert reactor.getDelayedCalls() == []


# --- a hostile endpoint ----------------------------------------------------------------


class Hostile(Resource):
    """An S3 endpoint that lies: *answer* gives (status, headers, body) for a request."""

    isLeaf = True

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.answer = answer
        self.requests = 0

    def render(self, request: Any) -> bytes:
        self.requests += 1
        if self.requests > 50:  # what the client under test should never come to
            status, headers, body = 500, {}, b"<Error><Code>TooMany</Code></Error>"
        else:
            status, headers, body = self.answer(request)
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return bytes(body)


def against(answer: Any) -> tuple[S3Client, Hostile, StubTreq]:
    client = S3Client(storage_config(), MemoryReactorClock())
    endpoint = Hostile(answer)
    stub = StubTreq(endpoint)
    client._http = stub
    return client, endpoint, stub


def settle(stub: StubTreq, d: Deferred[Any], rounds: int = 300) -> Any:
    """The result of *d* once the stub answered; raises if it is still waiting."""
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(rounds):
        if results:
            break
        stub.flush()
    assert results, "still waiting after {rounds} answers"
    return results[0]


def listing(page: int, token: str) -> bytes:
    contents = "".join(
        f"<Contents><Key>p/blobs/sha256/{page:04d}{i:060d}</Key><Size>1</Size>"
        "<LastModified>2026-01-01T00:00:00Z</LastModified></Contents>"
        for i in range(3)
    )
    return (
        f"<ListBucketResult>{contents}<IsTruncated>true</IsTruncated>"
        f"<NextContinuationToken>{token}</NextContinuationToken></ListBucketResult>"
    ).encode()


def test_a_listing_that_repeats_its_continuation_token_ends():
    client, endpoint, stub = against(lambda request: (200, {}, listing(0, "same")))
    result = settle(stub, Deferred.fromCoroutine(client.list_objects("p/blobs/")))
    assert isinstance(result, Failure) and result.check(S3Error)
    assert "continuation" in str(result.value)
    assert endpoint.requests <= 3


def test_a_listing_that_never_ends_is_bounded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(s3, "MAX_LISTED", 30)
    pages = iter(range(1_000_000))

    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        page = next(pages)
        return 200, {}, listing(page, f"t{page}")

    client, endpoint, stub = against(answer)
    result = settle(stub, Deferred.fromCoroutine(client.list_objects("p/blobs/")))
    assert isinstance(result, Failure) and result.check(S3Error)
    assert "more than 30" in str(result.value)
    assert endpoint.requests <= 11


@pytest.mark.parametrize("size", ["-5", "many", "1" * 30])
def test_a_listed_size_that_is_not_a_size_is_an_error(size: str):
    body = (
        "<ListBucketResult><Contents><Key>p/blobs/sha256/aa</Key>"
        f"<Size>{size}</Size></Contents><IsTruncated>false</IsTruncated></ListBucketResult>"
    ).encode()
    client, _, stub = against(lambda request: (200, {}, body))
    result = settle(stub, Deferred.fromCoroutine(client.list_objects("p/blobs/")))
    assert isinstance(result, Failure) and result.check(S3Error), result


@pytest.mark.parametrize("length", ["-5", "+5", "0x5", "9" * 30])
def test_a_head_with_a_content_length_that_is_not_a_size_is_an_error(length: str):
    def answer(request: Any) -> tuple[int, dict[str, str], bytes]:
        request.responseHeaders.setRawHeaders(b"content-length", [length.encode()])
        return 200, {}, b""

    client, _, stub = against(answer)
    result = settle(stub, Deferred.fromCoroutine(client.head("p/blobs/sha256/aa")))
    assert isinstance(result, Failure) and result.check(S3Error), result


def test_an_error_message_is_bounded_and_printable():
    message = "fake\r\nlog line\t" + "x" * 100_000
    body = f"<Error><Code>Slow\nDown</Code><Message>{message}</Message></Error>".encode()
    client, _, stub = against(lambda request: (503, {}, body))
    result = settle(stub, Deferred.fromCoroutine(client.delete("p/blobs/sha256/aa")))
    assert isinstance(result, Failure) and result.check(S3Error)
    text = str(result.value)
    assert len(text) < 600 and text.isprintable(), text
    assert result.value.code is not None and len(result.value.code) <= 64


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-be"])
def test_an_xml_answer_with_a_dtd_is_refused_in_any_encoding(encoding: str):
    bomb = (
        f'<?xml version="1.0" encoding="{encoding}"?>'
        '<!DOCTYPE e [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        "<Error><Code>&b;</Code></Error>"
    ).encode(encoding)
    if encoding == "utf-16-be":
        bomb = b"\xfe\xff" + bomb
    client, _, stub = against(lambda request: (200, {}, bomb))
    result = settle(stub, Deferred.fromCoroutine(client.create_upload("p/blobs/sha256/aa")))
    assert isinstance(result, Failure) and result.check(S3Error)
    assert "DTD" in str(result.value) or "encoding" in str(result.value)


# --- a stored object read in a range ------------------------------------------------


class Answer:
    """An unread answer to a GET of a stored object."""

    def __init__(self, code: int, length: int, content_range: str | None = None) -> None:
        self.code = code
        self.length = length
        self.headers = Headers({"content-range": [content_range]} if content_range else {})
        self.discarded = False

    def deliverBody(self, protocol: Any) -> None:
        self.discarded = True


class Ranged(Bucket):
    """A bucket whose GETs get *answer*."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer

    async def get(self, key: str, start: int = 0, end: int | None = None) -> Answer:
        return self.answer


def open_range(answer: Answer, start: int, end: int | None) -> Any:
    reactor = MemoryReactorClock()
    storage = S3Storage(
        storage_config(),
        reactor,
        run_now,
        Quota(Records(), None, reactor),  # type: ignore[arg-type]
        Metrics(),
        client=Ranged(answer),  # type: ignore[arg-type]
    )
    digest = "sha256:" + "ab" * 32
    opened = result_of(storage.open(digest, 1000, start, end))
    assert storage.records.in_use(digest) == (opened is not None)
    return opened


@pytest.mark.parametrize(
    "answer",
    [
        Answer(200, UNKNOWN_LENGTH),  # the whole object, chunked
        Answer(206, UNKNOWN_LENGTH, "bytes 0-899/1000"),  # another range
        Answer(206, 900, "bytes 0-899/1000"),
        Answer(206, 900, "bytes 100-999/2000"),  # another object's size
        Answer(206, 900),  # no Content-Range
    ],
)
def test_a_stored_range_answered_with_other_bytes_is_not_served(answer: Answer):
    assert open_range(answer, 100, None) is None
    assert answer.discarded


def test_a_stored_range_answered_as_asked_is_served():
    answer = Answer(206, UNKNOWN_LENGTH, "bytes 100-499/1000")
    assert open_range(answer, 100, 500) is answer
    assert not answer.discarded
