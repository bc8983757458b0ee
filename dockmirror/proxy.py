"""Egress through an HTTP proxy: which connections use one, and the ``CONNECT`` tunnel.

An upstream's ``proxy`` key names its proxy (or ``"none"``); without it the
environment's ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY`` (or their
lower-case forms) apply, as for curl and Go programs.  ``NO_PROXY`` lists
host names (matched with their subdomains; a leading dot is ignored), IP
addresses, CIDR networks, each optionally with ``:port``, or ``*``.

Every connection through a proxy is a ``CONNECT`` tunnel: TLS runs inside it,
end to end to the registry, with the registry's certificate verified as for a
direct connection.  The proxy is never given anything but the target's host
and port (and its own credentials).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dockmirror.hostnames import is_host_name

#: The longest reply header accepted from a proxy to ``CONNECT``.
REPLY_LIMIT = 16 << 10
#: Seconds to wait for a proxy's reply to ``CONNECT``.
REPLY_TIMEOUT = 30.0
#: Seconds to wait for the proxy to accept the connection (unless told otherwise).
CONNECT_TIMEOUT = 30.0


class ProxyError(ConnectError):
    """The proxy could not be reached, or refused the tunnel; the message names the proxy."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "proxy error"


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: where it is, and the credentials it asks for (never shown)."""

    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """``http://host:port``, as logs and errors name the proxy."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __repr__(self) -> str:
        return f"<proxy {self.name}{' with credentials' if self.username is not None else ''}>"

    @property
    def authorization(self) -> str | None:
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def parse_proxy(url: str, username: str | None = None, password: str | None = None) -> Proxy:
    """A proxy from ``http://[user:password@]host[:port]``; ValueError says what is wrong."""
    if "://" not in url:
        url = "http://" + url  # as curl and Go read "proxy.corp:3128"
    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("the proxy's port is not a number from 0 to 65535") from None
    host = (parts.hostname or "").lower()
    if parts.scheme != "http":
        raise ValueError("the proxy must be an http:// URL (TLS then runs through it)")
    if not host or not (is_host_name(host) or _address(host) is not None):
        raise ValueError("the proxy URL has no host name or address")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError("the proxy URL is only http://[user:password@]host:port")
    if parts.username is not None:
        if username is not None:
            raise ValueError("proxy credentials go in the URL or in proxy_username, not both")
        username, password = unquote(parts.username), unquote(parts.password or "")
    return Proxy(host, port, username, password)


def redact(url: str) -> str:
    """*url* with any password in it replaced by ``***``."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return url.replace(parts.netloc, f"{user}:***@{netloc[2]}", 1)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class NoProxy:
    """One ``NO_PROXY`` entry."""

    host: str | None = None  # a host name suffix
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None
    everything: bool = False

    @classmethod
    def parse(cls, entry: str) -> NoProxy | None:
        """The entry, or None for one that cannot be read (ignored, as Go does)."""
        entry = entry.strip().lower()
        if entry == "*":
            return cls(everything=True)
        try:
            return cls(network=ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            pass
        host, port = entry, None
        if entry.startswith("[") and "]:" in entry:
            host, _, rest = entry[1:].partition("]:")
            port = int(rest) if rest.isdigit() else None
        elif entry.count(":") == 1:
            host, _, rest = entry.partition(":")
            if not rest.isdigit():
                return None
            port = int(rest)
        address = _address(host)
        if address is not None:
            return cls(network=ipaddress.ip_network(address), port=port)
        host = host.lstrip("*").lstrip(".")
        return cls(host=host, port=port) if is_host_name(host) else None

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            address = _address(host)
            return address is not None and address in self.network
        assert self.host is not None
        return host == self.host or host.endswith("." + self.host)


@dataclass(frozen=True)
class ProxyRules:
    """Which proxy, if any, the connections of one upstream go through."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: tuple[NoProxy, ...] = ()
    source: str = "none"  # "config", "environment" or "none", for the log

    def for_target(self, scheme: str, host: str, port: int) -> Proxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None:
            return None
        host = host.lower().strip("[]")
        if any(entry.matches(host, port) for entry in self.no_proxy):
            return None
        return proxy

    def describe(self) -> str:
        proxies = {p.name for p in (self.http, self.https) if p is not None}
        if not proxies:
            return "direct"
        return f"through {', '.join(sorted(proxies))} ({self.source})"


def _environment(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name) or environ.get(name.lower()) or ""


def proxy_rules(
    setting: str | None,
    username: str | None,
    password: str | None,
    no_proxy: tuple[str, ...],
    environ: Mapping[str, str],
) -> ProxyRules:
    """An upstream's rules from its ``proxy`` keys, or else from *environ*.

    ValueError names what cannot be used; the message never holds a password.
    """
    if setting == "none":
        return ProxyRules()
    if setting is not None:
        try:
            proxy = parse_proxy(setting, username, password)
        except ValueError as e:
            raise ValueError(f"proxy {redact(setting)!r}: {e}") from None
        entries = tuple(e for e in map(NoProxy.parse, no_proxy) if e is not None)
        return ProxyRules(proxy, proxy, entries, "config")
    found: dict[str, Proxy | None] = {}
    for scheme in ("http", "https"):
        value = _environment(environ, f"{scheme.upper()}_PROXY").strip()
        try:
            found[scheme] = parse_proxy(value) if value else None
        except ValueError as e:
            raise ValueError(f"{scheme.upper()}_PROXY {redact(value)!r}: {e}") from None
    entries = tuple(
        e for e in map(NoProxy.parse, _environment(environ, "NO_PROXY").split(",")) if e is not None
    )
    return ProxyRules(found["http"], found["https"], entries, "environment")


# --- the tunnel ---------------------------------------------------------------------


class _Tunnel(Protocol):
    """Sends ``CONNECT``, reads the proxy's reply, then hands the connection on."""

    def __init__(self, proxy: Proxy, target: str, factory: Any, reactor: Any) -> None:
        self._proxy = proxy
        self._target = target
        self._factory = factory
        self._reactor = reactor
        self._buffer = b""
        self._inner: Any = None
        self.ready: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self._timeout: Any = None

    def _cancel(self, _: Any) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        lines = [f"CONNECT {self._target} HTTP/1.1", f"Host: {self._target}"]
        if self._proxy.authorization is not None:
            lines.append(f"Proxy-Authorization: {self._proxy.authorization}")
        assert self.transport is not None
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        self._timeout = self._reactor.callLater(REPLY_TIMEOUT, self._no_reply)

    def _no_reply(self) -> None:
        self._timeout = None
        self._fail(f"no answer to CONNECT {self._target} within {REPLY_TIMEOUT:.0f}s")

    def _fail(self, why: str) -> None:
        if not self.ready.called:
            self.ready.errback(ProxyError(string=f"proxy {self._proxy.name}: {why}"))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > REPLY_LIMIT:
                self._fail(f"a reply to CONNECT over {REPLY_LIMIT} bytes")
            return
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        status_line = self._buffer[:end].split(b"\r\n", 1)[0].decode("latin-1")
        rest = self._buffer[end + 4 :]
        self._buffer = b""
        parts = status_line.split(" ", 2)
        tunnelled = len(parts) > 1 and re.fullmatch(r"2[0-9][0-9]", parts[1]) is not None
        if not (parts[0].startswith("HTTP/1.") and tunnelled):
            shown = "".join(c if " " <= c < "\x7f" else "?" for c in status_line[:100])
            self._fail(f"refused CONNECT to {self._target}: {shown!r}")
            return
        assert self.transport is not None
        self._inner = self._factory.buildProtocol(self.transport.getPeer())
        if self._inner is None:
            self._fail("the connection was not wanted")
            return
        self._inner.makeConnection(self.transport)
        self.ready.callback(self._inner)
        if rest:
            self._inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self.ready.called:
            self.ready.errback(
                ProxyError(
                    string=f"proxy {self._proxy.name} closed the connection before"
                    f" answering CONNECT to {self._target}"
                )
            )


class _TunnelFactory(Factory):
    noisy = False

    def __init__(self, tunnel: _Tunnel) -> None:
        self._tunnel = tunnel

    def buildProtocol(self, addr: Any) -> _Tunnel:
        return self._tunnel


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """A connection to *host*:*port* through a ``CONNECT`` tunnel of *proxy*.

    *check* runs first (the address policy of the target); the proxy itself
    is the operator's choice and is connected to wherever it is.
    """

    def __init__(
        self,
        reactor: Any,
        proxy: Proxy,
        host: str,
        port: int,
        check: Callable[[], Awaitable[None]] | None = None,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._proxy = proxy
        self._host = host
        self._port = port
        self._check = check

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        if self._check is not None:
            await self._check()
        host = f"[{self._host}]" if ":" in self._host else self._host
        tunnel = _Tunnel(self._proxy, f"{host}:{self._port}", factory, self._reactor)
        endpoint = HostnameEndpoint(
            self._reactor, self._proxy.host, self._proxy.port, timeout=self._timeout
        )
        try:
            await endpoint.connect(_TunnelFactory(tunnel))
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every way of not reaching the proxy
            raise ProxyError(
                string=f"proxy {self._proxy.name} cannot be reached: {e or type(e).__name__}"
            ) from e
        return await tunnel.ready
