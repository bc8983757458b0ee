"""The TOML configuration: its schema, defaults and validation.

Each section is a dataclass whose fields are the user-facing keys; the loader
checks names and types against those fields, so an unknown key or a wrong type
is refused with a message naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from twisted.plugin import getPlugins

from dockmirror import plugins
from dockmirror._interfaces import IUpstream
from dockmirror.egress import CONNECT_TIMEOUT, UpstreamTLS, load_upstream_tls
from dockmirror.forwarded import HEADERS as PROXY_HEADERS
from dockmirror.hostnames import HostPattern, is_host_name, parse_host
from dockmirror.portal import config as portal_config
from dockmirror.portal.config import PortalConfig
from dockmirror.proxy import ProxyRules, proxy_rules, redact
from dockmirror.reference import NAME_MAX, NAME_RE, TAG_RE

EMBEDDED = "(embedded default)"
#: The most worker processes one service may run.
MAX_WORKERS = 64
#: The most PostgreSQL connections of one process's pool (``[cluster] pool_size``).
MAX_POOL_SIZE = 64


#: Default seconds an upstream may stay silent before its headers or within a body
#: (the default connect timeout is egress.CONNECT_TIMEOUT).
READ_TIMEOUT = 60.0

#: Defaults of the [server] limits on client connections (see dockmirror.connections).
HEADER_TIMEOUT = 30.0
IDLE_TIMEOUT = 60.0
SEND_TIMEOUT = 60.0
MAX_CONNECTIONS = 1024
MAX_CONNECTIONS_PER_CLIENT = 128

_UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and file."""


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ("tcp:5000:interface=127.0.0.1",)
    public_url: str = "http://127.0.0.1:5000"
    #: Seconds a client has to send a whole request (line, headers and body)
    #: once its first byte arrived.
    header_timeout: float = HEADER_TIMEOUT
    #: Seconds an idle keep-alive connection is kept open.
    idle_timeout: float = IDLE_TIMEOUT
    #: Seconds a response may wait on a client that takes none of its bytes.
    send_timeout: float = SEND_TIMEOUT
    #: Client connections served at once, over all listeners; more are refused.
    max_connections: int = MAX_CONNECTIONS
    #: Client connections one address (an IPv6 /64) may hold at once.
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    #: Reverse proxies (CIDRs) whose ``proxy_header`` names the client's address.
    trusted_proxies: tuple[str, ...] = ()
    #: The header those proxies write: "X-Forwarded-For" or "Forwarded".
    proxy_header: str = "X-Forwarded-For"
    #: Worker processes serving the listeners: a number, or "auto" for one per usable CPU.
    workers: int | str = 1

    @property
    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        assert isinstance(self.workers, int)
        return self.workers


@dataclass(frozen=True)
class AuthConfig:
    required: bool = False
    database: str = "dockmirror-data/keys.sqlite"
    #: Lifetime of the bearer tokens /docker-auth/token issues, in seconds.
    token_ttl: int = 300
    #: Repositories served without login, as ``UPSTREAM/REPOSITORY-PREFIX``
    #: (matched on whole path components after routing, e.g. "dockerhub/library").
    anonymous_repos: tuple[str, ...] = ()


@dataclass(frozen=True)
class ManholeConfig:
    #: A Twisted endpoint string for the SSH manhole; no manhole without it.
    listen: str | None = None
    #: OpenSSH authorized_keys file, re-read at each login.
    authorized_keys: str | None = None


OVERSIZE_POLICIES = ("passthrough", "reject")


@dataclass(frozen=True)
class CacheConfig:
    directory: str = "dockmirror-data/cache"
    #: The most the cache may hold on disk, as a size string; None: no quota.
    max_size: str | None = None
    #: The largest blob the cache will keep; None: no limit.
    max_layer_size: str | None = None
    #: What to do with a blob over max_layer_size: stream it uncached, or refuse it.
    oversize: str = "passthrough"
    #: Seconds a manifest fetched by tag is served before it is revalidated upstream.
    manifest_ttl: int = 3600
    #: Serve an expired manifest when the upstream is down, 5xx or 429.
    serve_stale: bool = True
    #: Free space to leave on the cache's file system, as a size string;
    #: None: the lesser of 256 MiB and 5 % of the file system.
    min_free: str | None = None

    @property
    def min_free_bytes(self) -> int | None:
        return None if self.min_free is None else parse_size(self.min_free)

    @property
    def max_size_bytes(self) -> int | None:
        return None if self.max_size is None else parse_size(self.max_size)

    @property
    def max_layer_size_bytes(self) -> int | None:
        return None if self.max_layer_size is None else parse_size(self.max_layer_size)


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r" *([0-9]{1,20}(?:\.[0-9]{1,9})?) *([a-zA-Z]*) *")


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"500MB"`` (decimal) or ``"5GiB"`` (binary)."""
    m = _SIZE_RE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a size: use a number with B, kB, MB, GB, TB (powers of 1000)"
            ' or KiB, MiB, GiB, TiB (powers of 1024), such as "500MB" or "5GiB"'
        )
    return int(Fraction(m.group(1)) * _UNITS[unit])


_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+|\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"6h"``, ``"1h30m"``, ``"90s"`` or ``"600"`` (seconds)."""
    text = text.strip()
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a duration: use numbers with s, m, h or d, such as"
            ' "6h", "1h30m" or "90s"'
        )
    if text[-1].isdigit():
        return float(text)
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


#: The most images a warm list may name.
WARM_IMAGES_MAX = 1000
_PLATFORM_RE = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")


@dataclass(frozen=True)
class WarmConfig:
    #: Images kept cached and fresh, as ``UPSTREAM/REPOSITORY:TAG``.
    images: tuple[str, ...] = ()
    #: Time between warm rounds, as a duration.
    interval: str = "6h"
    #: Platforms of multi-platform images to warm, as ``os/arch[/variant]``; empty: all.
    platforms: tuple[str, ...] = ()
    #: The share of ``cache.max_size`` that warm images keep from eviction.
    max_share: float = 0.5

    @property
    def interval_seconds(self) -> float:
        return parse_duration(self.interval)


@dataclass(frozen=True)
class WarmImage:
    """One image of the warm list: the upstream's configured name, a repository there, a tag.

    *alias* is the registry host the image was named by, when it was (``eu.gcr.io``).
    """

    upstream: str
    repository: str
    tag: str
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.alias or self.upstream}/{self.repository}:{self.tag}"


def _upstream_serving(host: str, upstreams: Mapping[str, UpstreamConfig]) -> tuple[str, str] | None:
    """The upstream whose aliases (its own, its plugin's) match the registry *host*, as routed."""
    name = parse_host(host)
    if name is None:
        return None
    plugins = upstream_plugins()
    for upstream, u in upstreams.items():
        plugin = plugins.get(u.plugin)
        patterns = (*(plugin.aliases if plugin is not None else ()), *u.aliases)
        if any(HostPattern.parse(p).matches(name) for p in patterns):
            return upstream, str(name)
    return None


def parse_warm_image(text: str, upstreams: Mapping[str, UpstreamConfig]) -> WarmImage:
    """``UPSTREAM/REPOSITORY:TAG``, with UPSTREAM the name of an ``[upstreams.NAME]`` table,
    or a registry host one of them serves, as clients name it (``eu.gcr.io``)."""
    names = sorted(upstreams)
    first, _, rest = text.partition("/")
    upstream, alias = first, None
    if first not in upstreams and "." in first:
        upstream, alias = _upstream_serving(first, upstreams) or (first, None)
    repository, colon, tag = rest.rpartition(":")
    if (
        upstream not in names
        or not colon
        or len(repository) > NAME_MAX
        or not NAME_RE.fullmatch(repository)
        or not TAG_RE.fullmatch(tag)
    ):
        raise ValueError(
            f"{text[:300]!r} is not UPSTREAM/REPOSITORY:TAG with UPSTREAM one of"
            f" {', '.join(names) or '(none configured)'}, or a registry host one of them"
            ' serves (e.g. "dockerhub/library/alpine:3", "eu.gcr.io/project/app:1")'
        )
    return WarmImage(upstream, repository, tag, alias)


@dataclass(frozen=True)
class MetricsConfig:
    allow: tuple[str, ...] = ()
    listen: tuple[str, ...] = ()


#: Field metadata of a value never shown (reprs, ``--check``, the manhole).
SECRET = {"secret": True}
#: Field metadata of a URL whose password is never shown.
SECRET_URL = {"secret": "url"}


def redacted_repr(section: Any) -> str:
    """A config dataclass's repr, with the values of its secret fields shown as ``***``."""

    def shown(f: dataclasses.Field[Any]) -> str:
        value = getattr(section, f.name)
        secret = f.metadata.get("secret")
        if secret == "url" and isinstance(value, str):
            return repr(redact(value))
        return "'***'" if secret and value is not None else repr(value)

    values = ", ".join(f"{f.name}={shown(f)}" for f in dataclasses.fields(section) if f.repr)
    return f"{type(section).__name__}({values})"


@dataclass(frozen=True)
class MirrorConfig:
    """A fallback endpoint of an upstream: another URL serving the same registry."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, metadata=SECRET)
    #: Whether tags resolved by this endpoint are believed (digests always are checked).
    trust_tags: bool = False

    __repr__ = redacted_repr


@dataclass(frozen=True)
class UpstreamConfig:
    plugin: str
    url: str | None = None
    aliases: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, metadata=SECRET)
    default: bool = False
    #: Seconds to open a connection (TCP and TLS) to the upstream.
    connect_timeout: float = CONNECT_TIMEOUT
    #: Seconds the upstream may stay silent: before its response headers,
    #: and between two reads of a body.
    read_timeout: float = READ_TIMEOUT
    #: Origins of token services on other hosts that may receive the credentials.
    token_realms: tuple[str, ...] = ()
    #: PEM certificates trusted for this upstream, in addition to the system's.
    ca: str | None = None
    #: PEM certificate (and chain) and key for upstreams that require mutual TLS.
    client_cert: str | None = None
    client_key: str | None = None
    #: Fallback endpoints, tried in order when the ``url`` fails.
    mirrors: tuple[MirrorConfig, ...] = ()
    #: ``http://[user:password@]host:port``, or "none"; unset: the environment's.
    proxy: str | None = field(default=None, metadata=SECRET_URL)
    proxy_username: str | None = None
    proxy_password: str | None = field(default=None, metadata=SECRET)
    #: Hosts, addresses and networks reached without the configured ``proxy``.
    no_proxy: tuple[str, ...] = ()
    #: Blobs of at least this size are fetched as ``parallel_parts`` ranged requests.
    parallel_min_size: str = "32MiB"
    #: Concurrent ranged requests for one large blob; 1 fetches every blob in one stream.
    parallel_parts: int = 4

    __repr__ = redacted_repr

    @property
    def parallel_min_bytes(self) -> int:
        return parse_size(self.parallel_min_size)


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
        return None if self.max_size is None else parse_size(self.max_size)

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


@dataclass(frozen=True)
class ClusterConfig:
    """Several nodes sharing one key store, index and fill coordination in PostgreSQL."""

    #: ``postgresql://user:password@host:port/dbname``; None: one node, SQLite.
    database: str | None = field(default=None, metadata=SECRET_URL)
    #: Endpoint string for node-to-node traffic (fills streamed between nodes).
    listen: str | None = None
    #: How the other nodes reach this one's ``listen``, e.g. ``http://10.0.0.5:5001``.
    node_url: str | None = None
    #: A file holding the secret that node-to-node requests carry; None: kept in PostgreSQL.
    secret_file: str | None = None
    #: Connections each process (each worker) may open for its queries.
    pool_size: int = 8

    __repr__ = redacted_repr


@dataclass(frozen=True)
class Config:
    source: str = EMBEDDED
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    manhole: ManholeConfig = field(default_factory=ManholeConfig)
    portal: PortalConfig = field(default_factory=PortalConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    warm: WarmConfig = field(default_factory=WarmConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def warm_images(self) -> list[WarmImage]:
        """The warm list, parsed (it was checked at load)."""
        return [parse_warm_image(image, self.upstreams) for image in self.warm.images]


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "cache": CacheConfig,
    "metrics": MetricsConfig,
    "manhole": ManholeConfig,
    "portal": PortalConfig,
    "warm": WarmConfig,
    "storage": StorageConfig,
    "cluster": ClusterConfig,
}


def upstream_plugins() -> dict[str, Any]:
    """Every ``IUpstream`` plugin that can be found, by name."""
    return {p.name: p for p in getPlugins(IUpstream, plugins)}


def load(path: str | None) -> Config:
    """Read and validate *path*; None gives the embedded default."""
    if path is None:
        return _build(
            EMBEDDED,
            {
                "upstreams": {
                    "dockerhub": {"plugin": "dockerhub", "default": True},
                    "ghcr": {"plugin": "ghcr"},
                    "quay": {"plugin": "quay"},
                    "gcr": {"plugin": "gcr"},
                    "k8s": {"plugin": "k8s"},
                }
            },
        )
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return _build(path, data)


def _build(source: str, data: dict[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            sections[key] = _section(source, key, _SECTIONS[key], value)
        elif key != "upstreams":
            raise ConfigError(f"{source}: unknown section [{key}]")
    upstreams_table = data.get("upstreams", {})
    if not isinstance(upstreams_table, dict):
        raise ConfigError(f"{source}: [upstreams] must be a table of [upstreams.NAME]")
    upstreams = {
        name: _section(source, f"upstreams.{name}", UpstreamConfig, table)
        for name, table in upstreams_table.items()
    }
    config = Config(source=source, upstreams=upstreams, **sections)
    _check(config)
    return config


def _section(source: str, where: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key {where}.{key} (known: {', '.join(sorted(names))})"
            )
        values[key] = _coerce(source, f"{where}.{key}", hints[key], value)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if required:
        raise ConfigError(f"{source}: missing key {where}.{required[0]}")
    return cls(**values)


def _coerce(source: str, key: str, hint: Any, value: Any) -> Any:
    """Check *value* against a field's type hint; lists become tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        for alternative in inner[1:]:
            if isinstance(value, alternative) and not isinstance(value, bool):
                return value
        return _coerce(source, key, inner[0], value)
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        cls = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list")
        for i, v in enumerate(value):
            if not isinstance(v, str | dict):
                raise ConfigError(f"{source}: {key}[{i}] must be a URL or a table")
        return tuple(
            cls(url=v) if isinstance(v, str) else _section(source, f"{key}[{i}]", cls, v)
            for i, v in enumerate(value)
        )
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _section(source, key, hint, value)
    if origin is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{source}: {key} must be a list of strings")
    expected = {bool: "a boolean", int: "an integer", str: "a string", float: "a number"}
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{source}: {key} must be {expected.get(hint, hint.__name__)}")
    return value


def _check(config: Config) -> None:
    """Checks that span keys."""
    source = config.source
    if not config.server.listen:
        raise ConfigError(f"{source}: server.listen must name at least one endpoint")
    known = upstream_plugins()
    defaults = [n for n, u in config.upstreams.items() if u.default]
    if len(defaults) > 1:
        raise ConfigError(
            f"{source}: upstreams.{defaults[1]}.default: only one upstream may be"
            f" the default (upstreams.{defaults[0]} is already)"
        )
    hosts: dict[str, str] = {}
    for name, upstream in config.upstreams.items():
        if not _UPSTREAM_NAME.fullmatch(name):
            raise ConfigError(
                f"{source}: [upstreams.{name}]: an upstream name is lower-case letters,"
                " digits, '-', '_' and '.'"
            )
        plugin = known.get(upstream.plugin)
        if plugin is None:
            raise ConfigError(
                f"{source}: upstreams.{name}.plugin: unknown plugin {upstream.plugin!r}"
                f" (available: {', '.join(sorted(known))})"
            )
        if upstream.url is None and plugin.default_url is None:
            raise ConfigError(
                f"{source}: upstreams.{name}.url is required for plugin {upstream.plugin!r}"
            )
        if upstream.url is not None and not upstream.url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: upstreams.{name}.url must be an http(s) URL")
        for key in ("connect_timeout", "read_timeout"):
            _check_seconds(source, f"upstreams.{name}.{key}", getattr(upstream, key))
        if (upstream.username is None) != (upstream.password is None):
            raise ConfigError(f"{source}: upstreams.{name}: username and password go together")
        _check_upstream_names(source, name, upstream, plugin)
        _check_parallel(source, name, upstream)
        _check_mirrors(source, name, upstream, plugin.default_url)
        upstream_tls(source, name, upstream)
        for host in upstream.hosts:
            if host.lower() in hosts:
                raise ConfigError(
                    f"{source}: upstreams.{name}.hosts: {host} already routes to"
                    f" upstreams.{hosts[host.lower()]}"
                )
            hosts[host.lower()] = name
    for key, cidrs in (
        ("metrics.allow", config.metrics.allow),
        ("server.trusted_proxies", config.server.trusted_proxies),
    ):
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"{source}: {key}: {cidr!r} is not a network") from None
    if config.server.proxy_header.lower() not in PROXY_HEADERS:
        raise ConfigError(f'{source}: server.proxy_header must be "X-Forwarded-For" or "Forwarded"')
    workers = config.server.workers
    if workers != "auto" and not (isinstance(workers, int) and 1 <= workers <= MAX_WORKERS):
        raise ConfigError(
            f'{source}: server.workers must be a number from 1 to {MAX_WORKERS}, or "auto"'
        )
    _check_public_url(source, config.server.public_url)
    _check_server(source, config.server)
    _check_cache(source, config.cache)
    _check_storage(source, config.storage)
    _check_cluster(source, config.cluster)
    _check_auth(config)
    try:
        portal_config.check(config.portal)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    _check_warm(config)


#: The longest timeout accepted, in seconds.
TIMEOUT_MAX = 3600.0


def _check_seconds(source: str, key: str, value: float) -> None:
    if not 0 < value <= TIMEOUT_MAX:
        raise ConfigError(
            f"{source}: {key} must be more than 0 and at most {TIMEOUT_MAX:.0f} seconds"
        )


def _check_public_url(source: str, url: str) -> None:
    """``scheme://host[:port]``: registry clients ask a registry for ``/v2/`` at its root."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: server.public_url must be an http(s) URL")
    parts = _url_parts(url)
    if parts is None:
        raise ConfigError(f"{source}: server.public_url {url[:200]!r} is not a URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(
            f"{source}: server.public_url must be the root of a host, as"
            f" https://mirror.example.com, not {url[:200]!r}: registry clients ask for /v2/"
            " at the root, the token service and the portal are under it"
            " (/docker-auth/token, /portal/); give the mirror a host name of its own"
        )
    if not parts.hostname:
        raise ConfigError(f"{source}: server.public_url must be the root of a host: no host")


def _check_server(source: str, server: ServerConfig) -> None:
    for key in ("header_timeout", "idle_timeout", "send_timeout"):
        _check_seconds(source, f"server.{key}", getattr(server, key))
    for key in ("max_connections", "max_connections_per_client"):
        if getattr(server, key) < 1:
            raise ConfigError(f"{source}: server.{key} must be at least 1")


def _tls(where: str, section: UpstreamConfig | StorageConfig) -> UpstreamTLS:
    """A section's ``ca``, ``client_cert`` and ``client_key``, read and checked.

    ValueError names *where* (``upstreams.NAME``, ``storage``), the key and the file.
    """
    try:
        return load_upstream_tls(section.ca, section.client_cert, section.client_key)
    except ValueError as e:
        raise ValueError(f"{where}.{e}") from None


def _proxies(
    where: str, section: UpstreamConfig | StorageConfig, environ: Mapping[str, str]
) -> ProxyRules:
    """A section's proxy rules: its ``proxy`` keys, or else the *environ* variables."""
    try:
        return proxy_rules(
            section.proxy,
            section.proxy_username,
            section.proxy_password,
            section.no_proxy,
            environ,
        )
    except ValueError as e:
        raise ValueError(f"{where}{'.' if section.proxy is not None else ': '}{e}") from None


def upstream_tls(source: str, name: str, upstream: UpstreamConfig) -> UpstreamTLS:
    """The upstream's ``ca``, ``client_cert`` and ``client_key``, read and checked."""
    try:
        return _tls(f"upstreams.{name}", upstream)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def upstream_proxies(
    source: str, name: str, upstream: UpstreamConfig, environ: Mapping[str, str]
) -> ProxyRules:
    """The upstream's proxy rules: its ``proxy`` keys, or else the *environ* variables."""
    try:
        return _proxies(f"upstreams.{name}", upstream, environ)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def storage_egress(
    storage: StorageConfig, environ: Mapping[str, str]
) -> tuple[UpstreamTLS, ProxyRules]:
    """What the S3 endpoint's connections trust and present, and the proxy they go through.

    The same keys as an upstream's, read the same way; ValueError names the
    key (``storage.ca``...) and the file that cannot be used.
    """
    return _tls("storage", storage), _proxies("storage", storage, environ)


def _check_upstream_names(source: str, name: str, upstream: UpstreamConfig, plugin: Any) -> None:
    """Aliases, hosts, token realms and the URL are host names of the strict grammar."""
    where = f"{source}: upstreams.{name}"
    for key, patterns in (("aliases", upstream.aliases), ("plugin's aliases", plugin.aliases)):
        for pattern in patterns:
            try:
                HostPattern.parse(pattern)
            except ValueError as e:
                raise ConfigError(f"{where}.{key}: {e}") from None
    for host in upstream.hosts:
        if not is_host_name(host.lower()):
            raise ConfigError(
                f"{where}.hosts: {host!r} is not a host name (labels of a-z, 0-9 and '-', no port)"
            )
    for realm in upstream.token_realms:
        parts = _url_parts(realm)
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path.strip("/")
        ):
            raise ConfigError(
                f"{where}.token_realms: {realm!r} is not an origin such as"
                ' "https://auth.example.com"'
            )
    url = upstream.url
    parts = None if url is None else _url_parts(url)
    if url is not None and (parts is None or parts.hostname is None or parts.username):
        raise ConfigError(
            f"{where}.url: {url!r} is not a URL with a host and port, or has credentials in it"
        )


def _url_parts(url: str) -> SplitResult | None:
    """*url* split, or None if it cannot be (a bad IPv6 literal, a port that is no port)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    return parts


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return (
        f"{(parts.hostname or '').lower()}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    )


def _check_mirrors(source: str, name: str, upstream: UpstreamConfig, default_url: Any) -> None:
    """Mirror URLs are as strict as ``url``; the proxy keys can be read."""
    where = f"{source}: upstreams.{name}"
    seen = {_host_port(str(upstream.url or default_url))}
    for i, mirror in enumerate(upstream.mirrors):
        parts = urlsplit(mirror.url)
        if parts.scheme not in ("http", "https") or parts.hostname is None or parts.username:
            raise ConfigError(
                f"{where}.mirrors[{i}]: {mirror.url!r} is not an http(s) URL with a host"
                " and without credentials"
            )
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ConfigError(f"{where}.mirrors[{i}]: {mirror.url!r} has a bad port") from None
        if _host_port(mirror.url) in seen:
            raise ConfigError(
                f"{where}.mirrors[{i}]: {_host_port(mirror.url)} is already an endpoint of"
                " this upstream (endpoints are told apart by host and port)"
            )
        seen.add(_host_port(mirror.url))
        if (mirror.username is None) != (mirror.password is None):
            raise ConfigError(f"{where}.mirrors[{i}]: username and password go together")
    _check_proxy_keys(where, upstream)
    if upstream.proxy is not None:
        upstream_proxies(source, name, upstream, {})


def _check_proxy_keys(where: str, section: UpstreamConfig | StorageConfig) -> None:
    if (section.proxy_username is None) != (section.proxy_password is None):
        raise ConfigError(f"{where}: proxy_username and proxy_password go together")
    if section.proxy is None and (section.proxy_username is not None or section.no_proxy):
        raise ConfigError(f"{where}: proxy_username and no_proxy need a proxy")


#: The most ranged requests one blob is fetched with.
PARALLEL_PARTS_MAX = 16
#: The smallest ``parallel_min_size``: smaller parts cost more requests than they save.
PARALLEL_MIN_SIZE_MIN = 1 << 20


def _check_parallel(source: str, name: str, upstream: UpstreamConfig) -> None:
    where = f"{source}: upstreams.{name}"
    parts = upstream.parallel_parts
    if isinstance(parts, bool) or not 1 <= parts <= PARALLEL_PARTS_MAX:
        raise ConfigError(
            f"{where}.parallel_parts must be a number from 1 (one stream per blob)"
            f" to {PARALLEL_PARTS_MAX}"
        )
    try:
        size = parse_size(upstream.parallel_min_size)
    except ValueError as e:
        raise ConfigError(f"{where}.parallel_min_size: {e}") from None
    if size < PARALLEL_MIN_SIZE_MIN:
        raise ConfigError(f"{where}.parallel_min_size must be at least 1MiB")


def _check_cache(source: str, cache: CacheConfig) -> None:
    for key in ("max_size", "max_layer_size", "min_free"):
        text = getattr(cache, key)
        if text is None:
            continue
        try:
            size = parse_size(text)
        except ValueError as e:
            raise ConfigError(f"{source}: cache.{key}: {e}") from None
        if size <= 0 and key != "min_free":
            raise ConfigError(f"{source}: cache.{key} must be more than zero bytes")
    if cache.oversize not in OVERSIZE_POLICIES:
        raise ConfigError(
            f"{source}: cache.oversize must be one of {', '.join(map(repr, OVERSIZE_POLICIES))}"
            f", not {cache.oversize!r}"
        )
    if cache.manifest_ttl < 0:
        raise ConfigError(f"{source}: cache.manifest_ttl must be zero or more seconds")


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: Prefixes and suffixes S3 keeps for its own kinds of bucket names.
_BUCKET_RESERVED = (("xn--", "sthree-", "amzn-s3-demo-"), ("-s3alias", "--ol-s3", "--x-s3"))


def is_aws_endpoint(endpoint: str | None) -> bool:
    """Whether *endpoint* is AWS S3's (None: AWS S3 in the configured region)."""
    if endpoint is None:
        return True
    host = (_url_parts(endpoint) or urlsplit("")).hostname or ""
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


def _check_storage(source: str, storage: StorageConfig) -> None:
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
        parts = _url_parts(storage.endpoint)
        if parts is None or parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
            raise ConfigError(
                f"{source}: storage.endpoint must be an http(s) URL with no path,"
                ' e.g. "https://s3.example.com"'
            )
    if storage.addressing is not None and storage.addressing not in S3_ADDRESSING:
        raise ConfigError(f'{source}: storage.addressing must be "path" or "virtual"')
    try:
        check_bucket(storage.bucket, storage.endpoint, not storage.path_style)
    except ValueError as e:
        raise ConfigError(f"{source}: storage.bucket {e}") from None
    if (storage.access_key is None) != (storage.secret_key is None):
        raise ConfigError(f"{source}: storage.access_key and storage.secret_key go together")
    if storage.max_size is not None:
        try:
            size = parse_size(storage.max_size)
        except ValueError as e:
            raise ConfigError(f"{source}: storage.max_size: {e}") from None
        if size <= 0:
            raise ConfigError(f"{source}: storage.max_size must be more than zero bytes")
    try:
        parse_duration(storage.stale_uploads)
    except ValueError as e:
        raise ConfigError(f"{source}: storage.stale_uploads: {e}") from None
    _check_proxy_keys(f"{source}: storage", storage)
    try:
        storage_egress(storage, {})
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


#: What ``pip install 'dockmirror[cluster]'`` brings that a cluster database needs.
CLUSTER_MODULES = ("psycopg", "psycopg_pool")


def _missing_module(names: tuple[str, ...]) -> str | None:
    """The first of *names* that cannot be imported, or None."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def check_database_url(where: str, url: str) -> None:
    """Check a cluster database URL, and that the cluster extra is there to use it."""
    parts = _url_parts(url)
    if parts is None or parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"{where} must be a postgresql:// URL (postgresql://user:password@host:5432/dockmirror)"
        )
    missing = _missing_module(CLUSTER_MODULES)
    if missing is not None:
        raise ConfigError(
            f"{where} needs the cluster extra, which is not installed"
            f" (no module {missing}): pip install 'dockmirror[cluster]'"
        )


def _check_cluster(source: str, cluster: ClusterConfig) -> None:
    if not 1 <= cluster.pool_size <= MAX_POOL_SIZE:
        raise ConfigError(f"{source}: cluster.pool_size must be a number from 1 to {MAX_POOL_SIZE}")
    if cluster.database is not None:
        check_database_url(f"{source}: cluster.database", cluster.database)
    elif cluster.listen is not None or cluster.node_url is not None:
        raise ConfigError(f"{source}: cluster.listen and cluster.node_url need cluster.database")
    if (cluster.listen is None) != (cluster.node_url is None):
        raise ConfigError(f"{source}: cluster.listen and cluster.node_url go together")
    if cluster.node_url is not None:
        parts = _url_parts(cluster.node_url)
        if parts is None or parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
            raise ConfigError(
                f"{source}: cluster.node_url must be an http(s) URL with no path,"
                ' e.g. "http://10.0.0.5:5001"'
            )


def _check_warm(config: Config) -> None:
    source, warm = config.source, config.warm
    if len(warm.images) > WARM_IMAGES_MAX:
        raise ConfigError(f"{source}: warm.images: at most {WARM_IMAGES_MAX} images")
    seen = set()
    for text in warm.images:
        try:
            image = parse_warm_image(text, config.upstreams)
        except ValueError as e:
            raise ConfigError(f"{source}: warm.images: {e}") from None
        if image in seen:
            raise ConfigError(f"{source}: warm.images: {text!r} is listed twice")
        seen.add(image)
    try:
        interval = warm.interval_seconds
    except ValueError as e:
        raise ConfigError(f"{source}: warm.interval: {e}") from None
    if interval < 1:
        raise ConfigError(f"{source}: warm.interval must be at least one second")
    for platform in warm.platforms:
        if not _PLATFORM_RE.fullmatch(platform):
            raise ConfigError(
                f"{source}: warm.platforms: {platform[:100]!r} is not OS/ARCHITECTURE[/VARIANT]"
                ' such as "linux/amd64" or "linux/arm/v7"'
            )
    if not 0 <= warm.max_share <= 1:
        raise ConfigError(f"{source}: warm.max_share must be between 0 and 1")


#: The longest token lifetime accepted: tokens cannot be recalled before they expire.
TOKEN_TTL_MAX = 3600


def _check_auth(config: Config) -> None:
    source = config.source
    if not 1 <= config.auth.token_ttl <= TOKEN_TTL_MAX:
        raise ConfigError(f"{source}: auth.token_ttl must be between 1 and {TOKEN_TTL_MAX} seconds")
    for prefix in config.auth.anonymous_repos:
        try:
            check_repository_prefix(prefix, config.upstreams)
        except ValueError as e:
            raise ConfigError(f"{source}: auth.anonymous_repos: {e}") from None
    if config.manhole.listen is not None and config.manhole.authorized_keys is None:
        raise ConfigError(f"{source}: manhole.authorized_keys is required with manhole.listen")


def check_repository_prefix(prefix: str, upstreams: Iterable[str]) -> str:
    """Check an access-control prefix: ``UPSTREAM`` or ``UPSTREAM/REPOSITORY-PREFIX``.

    Prefixes name repositories as routed (the ``[upstreams.NAME]`` and the
    repository there), so that every spelling a client may use for the same
    repository (``alpine``, ``library/alpine``, ``docker.io/library/alpine``,
    a Host-routed name) is covered by one rule.
    """
    names = sorted(upstreams)
    upstream, slash, rest = prefix.partition("/")
    if upstream not in names or (slash and not NAME_RE.fullmatch(rest)):
        raise ValueError(
            f"{prefix!r} is not UPSTREAM/PREFIX with UPSTREAM one of"
            f' {", ".join(names) or "(none configured)"} (e.g. "dockerhub/library")'
        )
    return prefix


def config_warnings(config: Config) -> list[str]:
    """What is allowed but probably a mistake, to log at start and print at ``--check``."""
    found = []
    known = upstream_plugins()
    for name, upstream in config.upstreams.items():
        url = upstream.url or known[upstream.plugin].default_url
        if upstream.username is not None and str(url).startswith("http://"):
            found.append(
                f"upstreams.{name}: credentials go to {url} over plain HTTP,"
                " readable by anyone on the path"
            )
        for i, mirror in enumerate(upstream.mirrors):
            if mirror.username is not None and mirror.url.startswith("http://"):
                found.append(
                    f"upstreams.{name}.mirrors[{i}]: credentials go to {mirror.url} over"
                    " plain HTTP, readable by anyone on the path"
                )
    return found


def listeners(config: Config) -> list[tuple[str, tuple[str, ...]]]:
    """Every endpoint string of the configuration, with its key, in the workers' order."""
    manhole = (config.manhole.listen,) if config.manhole.listen is not None else ()
    return [
        ("server.listen", config.server.listen),
        ("metrics.listen", config.metrics.listen),
        ("manhole.listen", manhole),
        ("cluster.listen", (config.cluster.listen,) if config.cluster.listen else ()),
    ]


def state_directory(config: Config) -> Path:
    """Where keys, signing keys and the SSH host key are kept."""
    return Path(config.auth.database).parent
