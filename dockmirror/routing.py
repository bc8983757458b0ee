"""Which upstream a request goes to, and under what repository name.

The order is fixed: the Host header, containerd's ``?ns=`` parameter, a path
prefix naming an upstream alias, then the default upstream.  Every name a
client gives is parsed as a host name (:mod:`dockmirror.hostnames`) before it
is matched; an ``ns`` or ``Host`` that is not one is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dockmirror.config import CONNECT_TIMEOUT, READ_TIMEOUT
from dockmirror.errors import RegistryError
from dockmirror.hostnames import HostName, HostPattern, parse_host, parse_host_header
from dockmirror.reference import check_name


@dataclass(frozen=True)
class Upstream:
    """One ``[upstreams.NAME]`` table joined with its plugin."""

    name: str
    plugin: Any  # IUpstream
    url: str | None
    aliases: tuple[HostPattern, ...]
    hosts: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = READ_TIMEOUT
    #: Token service origins on other hosts that may receive the credentials.
    token_realms: tuple[str, ...] = ()
    #: Fallback endpoints of the configured URL (``MirrorConfig``), in order.
    mirrors: tuple[Any, ...] = ()
    #: Blobs of at least this many bytes are fetched in ``parallel_parts`` ranged parts.
    parallel_min_size: int = 32 << 20
    parallel_parts: int = 4

    def matches(self, alias: HostName) -> bool:
        return any(pattern.matches(alias) for pattern in self.aliases)

    def base_url(self, alias: str | None) -> str:
        url = self.url or self.plugin.base_url(alias)
        assert url is not None  # the config check guarantees one
        return str(url).rstrip("/")

    @property
    def configured_url(self) -> str:
        """The URL the operator or the plugin names for this upstream."""
        return str(self.url or self.plugin.default_url).rstrip("/")

    def __repr__(self) -> str:
        return f"<upstream {self.name} ({self.plugin.name}) {self.url or self.plugin.default_url}>"


@dataclass(frozen=True)
class Route:
    """Where one request goes."""

    upstream: Upstream
    base_url: str
    repository: str  # the name at the upstream
    client_name: str  # the name as the client spelled it
    ns: str | None = None  # the ``?ns=`` that chose the upstream; links must carry it

    @property
    def key(self) -> str:
        """Identifies the upstream registry and repository, for caches and logs."""
        return f"{self.upstream.name}/{self.repository}"


class Router:
    def __init__(self, upstreams: list[Upstream], default: Upstream | None) -> None:
        self.upstreams = upstreams
        self.default = default
        self._by_host = {h.lower(): u for u in upstreams for h in u.hosts}

    def _by_alias(self, alias: HostName | None) -> Upstream | None:
        if alias is None:
            return None
        for upstream in self.upstreams:
            if upstream.matches(alias):
                return upstream
        return None

    def route(self, name: str, host: str | None = None, ns: str | None = None) -> Route:
        """Route a validated client-facing repository *name*."""
        if host is not None:
            host_name = parse_host_header(host)
            if host_name is None:
                raise RegistryError(
                    "NAME_UNKNOWN", "the Host header is not a host name", {"host": host[:255]}
                )
            upstream = self._by_host.get(host_name)
            if upstream is not None:
                return self._route(upstream, None, name, name)
        if ns is not None:
            alias = parse_host(ns)
            upstream = self._by_alias(alias)
            if alias is None or upstream is None:
                raise RegistryError(
                    "NAME_UNKNOWN",
                    f"registry {ns[:255]!r} is not mirrored here",
                    {"ns": ns[:255]},
                )
            return self._route(upstream, str(alias), name, name, ns=str(alias))
        first, _, rest = name.partition("/")
        if rest:
            upstream = self._by_alias(parse_host(first))
            if upstream is not None:
                return self._route(upstream, first, rest, name)
        if self.default is None:
            raise RegistryError(
                "NAME_UNKNOWN",
                "no upstream matches this repository and there is no default upstream",
                {"name": name},
            )
        return self._route(self.default, None, name, name)

    def route_to(self, upstream_name: str, repository: str, alias: str | None = None) -> Route:
        """Route a repository of the upstream named *upstream_name* in the configuration,
        at the registry host *alias* it serves (checked with the configuration), if given."""
        for upstream in self.upstreams:
            if upstream.name == upstream_name:
                client_name = repository if alias is None else f"{alias}/{repository}"
                return self._route(upstream, alias, repository, client_name)
        raise RegistryError("NAME_UNKNOWN", f"no upstream {upstream_name!r}")

    @staticmethod
    def _route(
        upstream: Upstream, alias: str | None, name: str, client_name: str, ns: str | None = None
    ) -> Route:
        repository = check_name(upstream.plugin.repository(name))
        return Route(upstream, upstream.base_url(alias), repository, client_name, ns)


def build_router(config: Any, plugins: dict[str, Any]) -> Router:
    """Make the router for a validated :class:`dockmirror.config.Config`."""
    upstreams = []
    default = None
    for name, u in config.upstreams.items():
        plugin = plugins[u.plugin]
        upstream = Upstream(
            name=name,
            plugin=plugin,
            url=u.url,
            aliases=tuple(HostPattern.parse(a) for a in (*plugin.aliases, *u.aliases)),
            hosts=u.hosts,
            username=u.username,
            password=u.password,
            connect_timeout=u.connect_timeout,
            read_timeout=u.read_timeout,
            token_realms=(*plugin.token_realms, *u.token_realms),
            mirrors=u.mirrors,
            parallel_min_size=u.parallel_min_bytes,
            parallel_parts=u.parallel_parts,
        )
        upstreams.append(upstream)
        if u.default:
            default = upstream
    return Router(upstreams, default)
