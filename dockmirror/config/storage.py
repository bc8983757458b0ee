"""The [storage] section: the cache directory alone, or an S3 bucket too."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dockmirror.config.outbound import check_proxy_keys, section_proxies, section_tls
from dockmirror.config.values import (
    SECRET,
    SECRET_URL,
    ConfigError,
    check_root_url,
    check_size,
    optional_size,
    parse_duration,
    redacted_repr,
    url_parts,
)
from dockmirror.egress import UpstreamTLS
from dockmirror.hostnames import is_host_name
from dockmirror.proxy import ProxyRules

STORAGE_BACKENDS = ("filesystem", "s3")
S3_ADDRESSING = ("path", "virtual")


@dataclass(frozen=True)
class StorageConfig:
    """Where blobs are kept by digest: the cache directory alone, or an S3 bucket too."""

    backend: str = "filesystem"
    #: The S3 endpoint's base URL; None: AWS S3 in ``region``.
    endpoint: str | None = None
    bucket: str | None = None
    region: str = "us-east-1"
    #: Prepended to every object key (``<prefix>blobs/sha256/<hex>``).
    prefix: str = ""
    #: Without both keys, the usual AWS chain (environment, profile, instance role).
    access_key: str | None = None
    secret_key: str | None = field(default=None, metadata=SECRET)
    #: "path" or "virtual"; None: virtual-host style on AWS, path style elsewhere.
    addressing: str | None = None
    #: Answer a blob GET with a 307 to a short-lived presigned URL.
    redirect: bool = False
    #: The most the bucket may hold, as a size string; None: no quota.
    max_size: str | None = None
    #: Incomplete multipart uploads older than this (a duration) are aborted by a sweep.
    stale_uploads: str = "1d"
    #: PEM certificates trusted for the endpoint, in addition to the system's.
    ca: str | None = None
    #: PEM certificate (and chain) and key, for an endpoint that requires mutual TLS.
    client_cert: str | None = None
    client_key: str | None = None
    #: ``http://[user:password@]host:port``, or "none"; unset: the environment's.
    proxy: str | None = field(default=None, metadata=SECRET_URL)
    proxy_username: str | None = None
    proxy_password: str | None = field(default=None, metadata=SECRET)
    #: Hosts, addresses and networks reached without the configured ``proxy``.
    no_proxy: tuple[str, ...] = ()

    __repr__ = redacted_repr

    @property
    def max_size_bytes(self) -> int | None:
        return optional_size(self.max_size)

    @property
    def stale_uploads_seconds(self) -> float:
        return parse_duration(self.stale_uploads)

    @property
    def path_style(self) -> bool:
        """Path style unless told otherwise, or on AWS with a bucket a host name can carry.

        As AWS's own SDKs do: a bucket with a dot gets path style over
        https, where ``a.b.s3.amazonaws.com`` would not match the certificate.
        """
        if self.addressing is not None:
            return self.addressing == "path"
        if not is_aws_endpoint(self.endpoint):
            return True
        return "." in (self.bucket or "")


def storage_egress(
    storage: StorageConfig, environ: Mapping[str, str]
) -> tuple[UpstreamTLS, ProxyRules]:
    """What the S3 endpoint's connections trust and present, and the proxy they go through.

    The same keys as an upstream's, read the same way; ValueError names the
    key (``storage.ca``...) and the file that cannot be used.
    """
    return section_tls("storage", storage), section_proxies("storage", storage, environ)


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: Prefixes and suffixes S3 keeps for its own kinds of bucket names.
_BUCKET_RESERVED = (("xn--", "sthree-", "amzn-s3-demo-"), ("-s3alias", "--ol-s3", "--x-s3"))


def is_aws_endpoint(endpoint: str | None) -> bool:
    """Whether *endpoint* is AWS S3's (None: AWS S3 in the configured region)."""
    if endpoint is None:
        return True
    host = (url_parts(endpoint) or urlsplit("")).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def check_bucket(bucket: str, endpoint: str | None, virtual: bool) -> None:
    """Raise ValueError unless *bucket* is an S3 bucket name that can be used as addressed.

    S3's grammar: 3 to 63 of ``a-z 0-9 . -``, starting and ending with a
    letter or digit, dot-separated labels that neither start nor end with
    ``-``, not an IP address, none of S3's reserved prefixes and suffixes.
    Addressed as a virtual host, it becomes the first labels of the
    endpoint's host name, which must then be a host name; over https
    it must be one label, as a certificate's ``*.`` matches one.
    """
    shown = repr(bucket[:70])
    if (
        not _BUCKET_RE.fullmatch(bucket)
        or ".." in bucket
        or ".-" in bucket
        or "-." in bucket
        or bucket.startswith(_BUCKET_RESERVED[0])
        or bucket.endswith(_BUCKET_RESERVED[1])
    ):
        raise ValueError(f"{shown} is not an S3 bucket name")
    if all(label.isdigit() for label in bucket.split(".")):
        raise ValueError(f"{shown} is formatted as an IP address, which S3 refuses")
    if not virtual:
        return
    parts = urlsplit(endpoint or "https://s3.amazonaws.com")
    if not is_host_name(f"{bucket}.{parts.hostname or ''}"):
        raise ValueError(
            f"{shown} cannot be addressed as a virtual host of {parts.hostname}:"
            ' the endpoint must be a host name (or use addressing = "path")'
        )
    if parts.scheme == "https" and "." in bucket:
        raise ValueError(
            f"{shown} has a dot, so as a virtual host over https it would not match the"
            ' endpoint\'s certificate: use addressing = "path"'
        )


_PREFIX_RE = re.compile(r"(?:[A-Za-z0-9!_.*'()-]+/)*")
_REGION_RE = re.compile(r"[a-z0-9-]{1,32}")


def check_storage(source: str, storage: StorageConfig) -> None:
    if storage.backend not in STORAGE_BACKENDS:
        raise ConfigError(
            f"{source}: storage.backend must be one of {', '.join(map(repr, STORAGE_BACKENDS))}"
            f", not {storage.backend!r}"
        )
    if storage.backend == "filesystem":
        return
    if importlib.util.find_spec("botocore") is None:
        raise ConfigError(
            f"{source}: storage.backend = \"s3\" needs botocore: pip install 'dockmirror[cluster]'"
        )
    if storage.bucket is None:
        raise ConfigError(f'{source}: storage.bucket is required with backend = "s3"')
    if not _REGION_RE.fullmatch(storage.region):
        raise ConfigError(f"{source}: storage.region {storage.region[:40]!r} is not a region name")
    if len(storage.prefix) > 256 or not _PREFIX_RE.fullmatch(storage.prefix):
        raise ConfigError(
            f'{source}: storage.prefix must be path segments each ending in /, e.g. "mirror/"'
        )
    if storage.endpoint is not None:
        check_root_url(f"{source}: storage.endpoint", storage.endpoint, "https://s3.example.com")
    if storage.addressing is not None and storage.addressing not in S3_ADDRESSING:
        raise ConfigError(f'{source}: storage.addressing must be "path" or "virtual"')
    try:
        check_bucket(storage.bucket, storage.endpoint, not storage.path_style)
    except ValueError as e:
        raise ConfigError(f"{source}: storage.bucket {e}") from None
    if (storage.access_key is None) != (storage.secret_key is None):
        raise ConfigError(f"{source}: storage.access_key and storage.secret_key go together")
    if storage.max_size is not None:
        check_size(f"{source}: storage.max_size", storage.max_size)
    try:
        parse_duration(storage.stale_uploads)
    except ValueError as e:
        raise ConfigError(f"{source}: storage.stale_uploads: {e}") from None
    check_proxy_keys(f"{source}: storage", storage)
    try:
        storage_egress(storage, {})
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
