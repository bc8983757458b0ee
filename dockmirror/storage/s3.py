"""A small S3 client on Twisted: SigV4 requests with treq, bodies streamed or bounded.

botocore signs (its SigV4 signer and its credential chain: explicit keys,
else the environment, a profile, instance or container credentials); treq
sends, on one persistent pool.  Redirects are never followed, every body
read into memory is bounded, and a silent endpoint times out.  Only the
operations the blob tier needs are here: HEAD, ranged GET (unbuffered, for
the caller to stream), PUT, DELETE, the multipart upload calls, listing
objects and uploads, and presigned GET URLs.
"""

from __future__ import annotations

import hashlib
import os
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from botocore.session import get_session
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from dockmirror.config import StorageConfig, check_bucket, storage_egress
from dockmirror.egress import tls_failure, upstream_egress
from dockmirror.logs import printable
from dockmirror.upstream import UpstreamError, discard, read_small

log = Logger()

#: Seconds to connect to the endpoint, and to wait for its answer's headers ...
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 60.0
#: ... and the most of an answer (XML, an error) read into memory.
XML_LIMIT = 4 << 20
#: The most objects (or uploads) one listing takes in, over all its pages.
MAX_LISTED = 1_000_000
#: The longest error code and message taken from an answer (they end up in logs).
ERROR_TEXT = 64, 300
#: Seconds a presigned URL is valid.
PRESIGN_EXPIRY = 300
#: Credentials that expire within this many seconds are refreshed before use.
REFRESH_MARGIN = 300.0

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class S3Error(Exception):
    """The endpoint could not be reached, or answered with an error."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def transient(self) -> bool:
        """Unreachable, or a server error: the tier is unavailable, not the object absent."""
        return self.status is None or self.status >= 500 or self.status == 429


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float


@dataclass(frozen=True)
class UploadInfo:
    key: str
    upload_id: str
    initiated: float


class _Signer(S3SigV4Auth):
    """botocore's S3 signer, told the payload hash when the caller computed it already."""

    def payload(self, request: AWSRequest) -> str:
        known = request.context.get("payload_sha256")
        return str(known) if known else str(super().payload(request))


class S3Client:
    """Requests to one bucket of an S3-compatible endpoint.

    Connections are made as an upstream's are (:mod:`dockmirror.egress`):
    the system's CAs and ``[storage] ca``, a client certificate if one is
    configured, and ``[storage] proxy`` or the environment's proxy, with a
    ``CONNECT`` tunnel.  ValueError says which of those files cannot be used.
    """

    def __init__(
        self,
        config: StorageConfig,
        reactor: IReactorTime,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        assert config.bucket is not None
        # The bucket may become part of a host name: it is checked first.
        check_bucket(config.bucket, config.endpoint, not config.path_style)
        self.bucket = config.bucket
        self.region = config.region
        self._reactor = reactor
        endpoint = config.endpoint or f"https://s3.{config.region}.amazonaws.com"
        parts = urlsplit(endpoint)
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._path_style = config.path_style
        self._explicit = (
            Credentials(config.access_key, config.secret_key)
            if config.access_key is not None and config.secret_key is not None
            else None
        )
        self._chain: Any = None
        self._frozen: ReadOnlyCredentials | None = None
        self._frozen_at = 0.0
        tls, proxies = storage_egress(config, environ)
        egress = upstream_egress(
            reactor, "storage", self.url(), tls, proxies=proxies, connect_timeout=CONNECT_TIMEOUT
        )
        self.pool = egress.pool
        self._http = egress.http
        self.trusted = tls.trusted

    def __repr__(self) -> str:
        return f"<S3Client {self._scheme}://{self._netloc} bucket {self.bucket}>"

    # --- credentials -------------------------------------------------------------

    async def credentials(self) -> ReadOnlyCredentials:
        """The keys to sign with; the AWS chain is asked (in a thread) when they may expire."""
        if self._explicit is not None:
            return self._explicit.get_frozen_credentials()
        if self._frozen is None or self._stale():
            try:
                self._frozen = await deferToThread(self._resolve)
            except S3Error:
                raise
            except Exception as e:  # botocore's errors: a profile, metadata service ...
                raise S3Error(f"cannot get S3 credentials: {e}") from e
            self._frozen_at = time.monotonic()
        return self._frozen

    def _stale(self) -> bool:
        expiry = getattr(self._chain, "_expiry_time", None)
        if expiry is None:
            return time.monotonic() - self._frozen_at > REFRESH_MARGIN
        remaining = float(expiry.timestamp()) - time.time()
        return remaining < REFRESH_MARGIN

    def _resolve(self) -> ReadOnlyCredentials:
        """Blocking: the usual AWS chain (environment, profile, instance metadata)."""
        if self._chain is None:
            self._chain = get_session().get_credentials()
        if self._chain is None:
            raise S3Error("no S3 credentials: set storage.access_key and secret_key, or AWS_*")
        frozen: ReadOnlyCredentials = self._chain.get_frozen_credentials()
        return frozen

    # --- addressing --------------------------------------------------------------

    def url(self, key: str = "", query: dict[str, str] | None = None) -> str:
        path = "/" + quote(key, safe="/-_.~")
        if self._path_style:
            netloc, path = self._netloc, f"/{self.bucket}{path if key else '/'}"
        else:
            netloc = f"{self.bucket}.{self._netloc}"
        url = f"{self._scheme}://{netloc}{path}"
        if query:
            url += "?" + urlencode(sorted(query.items()), quote_via=quote)
        return url

    # --- requests ----------------------------------------------------------------

    async def request(
        self,
        method: str,
        key: str = "",
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        payload_sha256: str | None = None,
    ) -> IResponse:
        """Send one signed request; the response's body is the caller's to read or discard."""
        url = self.url(key, query)
        request = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body or b"")
        if payload_sha256 is not None:
            request.context["payload_sha256"] = payload_sha256
        _Signer(await self.credentials(), "s3", self.region).add_auth(request)
        try:
            response: IResponse = await self._http.request(
                method,
                url,
                headers=Headers({k: [str(v)] for k, v in request.headers.items()}),
                data=body,
                allow_redirects=False,
                unbuffered=True,
                timeout=REQUEST_TIMEOUT,
            )
        except Exception as e:  # connection refused, reset, timed out, TLS ...
            tls = tls_failure(e)
            if tls is not None:
                raise S3Error(
                    f"{method} {self._netloc}: {tls} (trusting {self.trusted}; see"
                    " storage.ca, and client_cert if the endpoint wants a client certificate)"
                ) from e
            raise S3Error(f"{method} {self._netloc}: {e.__class__.__name__}: {e}") from e
        return response

    async def read(self, response: IResponse, limit: int = XML_LIMIT) -> bytes:
        """A bounded answer body, whole."""
        try:
            return await read_small(response, limit, reactor=self._reactor, timeout=REQUEST_TIMEOUT)
        except UpstreamError as e:
            raise S3Error(f"reading the answer of {self._netloc}: {e}") from e

    async def check(self, response: IResponse, *expected: int) -> bytes:
        """The body of an answer with an *expected* status; others raise :class:`S3Error`."""
        body = await self.read(response)
        if response.code not in expected:
            raise _error(response.code, body)
        return body

    # --- operations ----------------------------------------------------------------

    async def head(self, key: str) -> int | None:
        """The object's size, or None if there is none."""
        response = await self.request("HEAD", key)
        discard(response)
        if response.code == 404:
            return None
        if response.code != 200:
            raise S3Error(f"HEAD {key}: {response.code}", response.code)
        values = response.headers.getRawHeaders("content-length") or []
        size = _size(values[0]) if len(values) == 1 else None
        if size is None:
            raise S3Error(f"HEAD {key}: no valid Content-Length", 502)
        return size

    async def get(self, key: str, start: int = 0, end: int | None = None) -> IResponse | None:
        """An unread response with bytes [start, end) of the object; None if there is none.

        The caller streams the body (``deliverBody``) or discards it.
        """
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        response = await self.request("GET", key, headers=headers)
        if response.code == 404:
            discard(response)
            return None
        if response.code not in (200, 206):
            raise _error(response.code, await self.read(response))
        return response

    async def put(
        self, key: str, data: bytes, sha256: str, md5: str, content_type: str | None = None
    ) -> None:
        headers = {"Content-MD5": md5}
        if content_type is not None:
            headers["Content-Type"] = content_type
        response = await self.request("PUT", key, headers=headers, body=data, payload_sha256=sha256)
        await self.check(response, 200)

    async def delete(self, key: str) -> None:
        response = await self.request("DELETE", key)
        await self.check(response, 200, 204, 404)

    async def create_upload(self, key: str) -> str:
        response = await self.request("POST", key, query={"uploads": ""})
        root = _xml(await self.check(response, 200))
        upload_id = root.findtext(f"{_NS}UploadId") or root.findtext("UploadId")
        if not upload_id:
            raise S3Error(f"no UploadId for {key}", 502)
        return upload_id

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: bytes, sha256: str, md5: str
    ) -> str:
        """Upload one part; returns its ETag."""
        response = await self.request(
            "PUT",
            key,
            query={"partNumber": str(number), "uploadId": upload_id},
            headers={"Content-MD5": md5},
            body=data,
            payload_sha256=sha256,
        )
        await self.check(response, 200)
        etags = response.headers.getRawHeaders("etag") or []
        if not etags:
            raise S3Error(f"no ETag for part {number} of {key}", 502)
        return etags[0]

    async def complete_upload(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{_escape(etag)}</ETag></Part>"
            for n, etag in enumerate(etags, 1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        response = await self.request(
            "POST",
            key,
            query={"uploadId": upload_id},
            headers={"Content-Type": "application/xml"},
            body=body,
            payload_sha256=hashlib.sha256(body).hexdigest(),
        )
        # S3 may answer 200 with an error in the body.
        answer = await self.check(response, 200)
        root = _xml(answer)
        if root.tag.endswith("Error"):
            raise S3Error(
                f"completing {key}: {root.findtext('Message') or root.findtext('Code')}",
                500,
                root.findtext("Code"),
            )

    async def abort_upload(self, key: str, upload_id: str) -> None:
        response = await self.request("DELETE", key, query={"uploadId": upload_id})
        await self.check(response, 200, 204, 404)

    async def list_uploads(self, prefix: str) -> list[UploadInfo]:
        """Every incomplete multipart upload under *prefix*."""
        uploads: list[UploadInfo] = []
        query = {"uploads": "", "prefix": prefix}
        while True:
            response = await self.request("GET", query=query)
            root = _xml(await self.check(response, 200))
            for item in _children(root, "Upload"):
                uploads.append(
                    UploadInfo(
                        _text(item, "Key"), _text(item, "UploadId"), _time(_text(item, "Initiated"))
                    )
                )
            _bounded(uploads, "uploads")
            if _text(root, "IsTruncated") != "true":
                return uploads
            markers = {
                "key-marker": _text(root, "NextKeyMarker"),
                "upload-id-marker": _text(root, "NextUploadIdMarker"),
            }
            query = {**query, **_onwards(query, markers)}

    async def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Every object under *prefix*."""
        objects: list[ObjectInfo] = []
        query = {"list-type": "2", "prefix": prefix}
        while True:
            response = await self.request("GET", query=query)
            root = _xml(await self.check(response, 200))
            for item in _children(root, "Contents"):
                key, size = _text(item, "Key"), _size(_text(item, "Size"))
                if size is None:
                    raise S3Error(f"listing {prefix}: {key[:200]!r} has no valid Size", 502)
                objects.append(ObjectInfo(key, size, _time(_text(item, "LastModified"))))
            _bounded(objects, "objects")
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return objects
            query = {**query, **_onwards(query, {"continuation-token": token})}

    async def presign(self, key: str, expires: int = PRESIGN_EXPIRY) -> str:
        """A URL that GETs the object without credentials for *expires* seconds."""
        request = AWSRequest(method="GET", url=self.url(key), headers={})
        S3SigV4QueryAuth(await self.credentials(), "s3", self.region, expires=expires).add_auth(
            request
        )
        return str(request.url)

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


def _size(text: str) -> int | None:
    """A size in bytes, as S3 writes one (decimal digits only), else None."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 19 else None


def _bounded(items: list[Any], what: str) -> None:
    if len(items) > MAX_LISTED:
        raise S3Error(f"the listing goes on past more than {MAX_LISTED} {what}", 502)


def _onwards(query: dict[str, str], markers: dict[str, str]) -> dict[str, str]:
    """The markers of the next page; an endpoint that gives the same ones again is refused."""
    if all(query.get(name) == value for name, value in markers.items()):
        raise S3Error("the listing repeats its continuation markers", 502)
    return markers


def _error(status: int, body: bytes) -> S3Error:
    code = message = None
    try:
        root = _xml(body) if body else None
    except S3Error:
        root = None
    if root is not None:
        code = printable(root.findtext("Code") or "", ERROR_TEXT[0]) or None
        message = printable(root.findtext("Message") or "", ERROR_TEXT[1])
    return S3Error(f"S3 answered {status}: {code or ''} {message or ''}".strip(), status, code)


class _NoDTD(ElementTree.TreeBuilder):
    """Builds the tree of an answer; a document type declaration, in any encoding, stops it."""

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise S3Error("refusing an XML answer with a DTD", 502)


def _xml(body: bytes) -> ElementTree.Element:
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise S3Error("refusing an XML answer with a DTD", 502)
    parser = ElementTree.XMLParser(target=_NoDTD())
    try:
        parser.feed(body)
        root: ElementTree.Element = parser.close()
    except (ElementTree.ParseError, ValueError) as e:  # ValueError: an encoding expat lacks
        raise S3Error(f"unreadable XML answer: {e}", 502) from e
    return root


def _children(root: ElementTree.Element, name: str) -> Iterator[ElementTree.Element]:
    yield from root.iter(f"{_NS}{name}")
    yield from root.iter(name)


def _text(element: ElementTree.Element, name: str) -> str:
    return element.findtext(f"{_NS}{name}") or element.findtext(name) or ""


def _time(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
