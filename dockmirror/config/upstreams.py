"""The [upstreams.NAME] tables: the registries mirrored, their endpoints and connections."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from twisted.plugin import getPlugins

from dockmirror import plugins
from dockmirror._interfaces import IUpstream
from dockmirror.config.outbound import check_proxy_keys, section_proxies, section_tls
from dockmirror.config.values import (
    SECRET,
    SECRET_URL,
    ConfigError,
    check_seconds,
    check_size,
    parse_size,
    redacted_repr,
    url_parts,
)
from dockmirror.egress import CONNECT_TIMEOUT, UpstreamTLS
from dockmirror.hostnames import HostPattern, is_host_name
from dockmirror.proxy import ProxyRules

#: Default seconds an upstream may stay silent before its headers or within a body
#: (the default connect timeout is egress.CONNECT_TIMEOUT).
READ_TIMEOUT = 60.0
_UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


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


def upstream_plugins() -> dict[str, Any]:
    """Every ``IUpstream`` plugin that can be found, by name."""
    return {p.name: p for p in getPlugins(IUpstream, plugins)}


def check_upstreams(source: str, upstreams: Mapping[str, UpstreamConfig]) -> None:
    """Each ``[upstreams.NAME]`` table, and that they agree with one another."""
    known = upstream_plugins()
    defaults = [n for n, u in upstreams.items() if u.default]
    if len(defaults) > 1:
        raise ConfigError(
            f"{source}: upstreams.{defaults[1]}.default: only one upstream may be"
            f" the default (upstreams.{defaults[0]} is already)"
        )
    hosts: dict[str, str] = {}
    for name, upstream in upstreams.items():
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
            check_seconds(source, f"upstreams.{name}.{key}", getattr(upstream, key))
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


def upstream_tls(source: str, name: str, upstream: UpstreamConfig) -> UpstreamTLS:
    """The upstream's ``ca``, ``client_cert`` and ``client_key``, read and checked."""
    try:
        return section_tls(f"upstreams.{name}", upstream)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def upstream_proxies(
    source: str, name: str, upstream: UpstreamConfig, environ: Mapping[str, str]
) -> ProxyRules:
    """The upstream's proxy rules: its ``proxy`` keys, or else the *environ* variables."""
    try:
        return section_proxies(f"upstreams.{name}", upstream, environ)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


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
        parts = url_parts(realm)
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
    parts = None if url is None else url_parts(url)
    if url is not None and (parts is None or parts.hostname is None or parts.username):
        raise ConfigError(
            f"{where}.url: {url!r} is not a URL with a host and port, or has credentials in it"
        )
    for key, named in [("url", [url] if url else []), ("token_realms", upstream.token_realms)]:
        _refuse_ipv6_literals(f"{where}.{key}", named)
    _refuse_ipv6_literals(f"{where}.mirrors", [mirror.url for mirror in upstream.mirrors])


def _refuse_ipv6_literals(where: str, urls: Iterable[str]) -> None:
    """Upstreams are reached by host name or IPv4 address: the HTTP client cannot
    send a request to an IPv6 literal such as ``http://[::1]:5000``."""
    for url in urls:
        parts = url_parts(url)  # malformed URLs are refused by their own checks
        if parts is not None and ":" in (parts.hostname or ""):
            raise ConfigError(
                f"{where}: {url!r} names an IPv6 address, which upstreams cannot be reached at;"
                " give a host name that resolves to it"
            )


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
    check_proxy_keys(where, upstream)
    if upstream.proxy is not None:
        upstream_proxies(source, name, upstream, {})


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
    size = check_size(f"{where}.parallel_min_size", upstream.parallel_min_size, positive=False)
    if size < PARALLEL_MIN_SIZE_MIN:
        raise ConfigError(f"{where}.parallel_min_size must be at least 1MiB")
