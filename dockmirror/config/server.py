"""The [server], [metrics] and [manhole] sections: what the mirror listens on and how."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from dockmirror.config.values import ConfigError, check_seconds, url_parts
from dockmirror.forwarded import HEADERS as PROXY_HEADERS

#: The most worker processes one service may run.
MAX_WORKERS = 64

#: Defaults of the [server] limits on client connections (see dockmirror.connections).
HEADER_TIMEOUT = 30.0
IDLE_TIMEOUT = 60.0
SEND_TIMEOUT = 60.0
MAX_CONNECTIONS = 1024
MAX_CONNECTIONS_PER_CLIENT = 128


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
class ManholeConfig:
    #: A Twisted endpoint string for the SSH manhole; no manhole without it.
    listen: str | None = None
    #: OpenSSH authorized_keys file, re-read at each login.
    authorized_keys: str | None = None


@dataclass(frozen=True)
class MetricsConfig:
    allow: tuple[str, ...] = ()
    listen: tuple[str, ...] = ()


def check_server(source: str, server: ServerConfig, metrics: MetricsConfig) -> None:
    """What the mirror listens on, whom it believes, and how many workers serve it."""
    for key, cidrs in (
        ("metrics.allow", metrics.allow),
        ("server.trusted_proxies", server.trusted_proxies),
    ):
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"{source}: {key}: {cidr!r} is not a network") from None
    if server.proxy_header.lower() not in PROXY_HEADERS:
        raise ConfigError(f'{source}: server.proxy_header must be "X-Forwarded-For" or "Forwarded"')
    workers = server.workers
    if workers != "auto" and not (isinstance(workers, int) and 1 <= workers <= MAX_WORKERS):
        raise ConfigError(
            f'{source}: server.workers must be a number from 1 to {MAX_WORKERS}, or "auto"'
        )
    check_public_url(source, server.public_url)
    for key in ("header_timeout", "idle_timeout", "send_timeout"):
        check_seconds(source, f"server.{key}", getattr(server, key))
    for key in ("max_connections", "max_connections_per_client"):
        if getattr(server, key) < 1:
            raise ConfigError(f"{source}: server.{key} must be at least 1")


def check_public_url(source: str, url: str) -> None:
    """``scheme://host[:port]``: registry clients ask a registry for ``/v2/`` at its root."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: server.public_url must be an http(s) URL")
    parts = url_parts(url)
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
