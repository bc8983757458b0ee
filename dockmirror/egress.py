"""How the mirror connects to one upstream: the addresses it may reach and the TLS it trusts.

Each upstream gets its own HTTP client and connection pool, so its trust
settings and client certificate are never used for another upstream's
requests.  Every connection resolves its host name first and checks each
address it would connect to: the host of the upstream's configured URL may be
anywhere, but any other host (a redirect target, a token realm) must be on a
public address, or on the same kind of non-public address as the configured
host itself (a registry on loopback may send the mirror to loopback, never to
a link-local or private network).  The check is made on the address that is
then connected to, so a DNS name that resolves to a private address is
caught as well as a literal one.

The upstream's mirrors are configured hosts too (they may be anywhere, and
their redirects may go where theirs may), but the upstream's client
certificate is presented only to the origin of its URL (scheme, host and
port): never to a mirror, even one on the same host, nor to a redirect
target.  Through a proxy (:mod:`dockmirror.proxy`),
every address the target host resolves to here is checked before the
tunnel is asked for, since the proxy may connect to any of them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, VerifyError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IOpenSSLClientConnectionCreator,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from dockmirror.logs import printable
from dockmirror.proxy import ProxyRules, TunnelEndpoint

log = Logger()

#: Seconds to wait for one address to accept a connection.
CONNECT_TIMEOUT = 30.0
#: Addresses of one host name tried, in the resolver's order, before giving up.
ADDRESSES_TRIED = 3
#: Idle persistent connections kept per host, for each upstream.
POOL_PER_HOST = 16

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DisallowedAddress(ConnectError):
    """The host resolves only to addresses this upstream may not reach."""


# --- addresses ------------------------------------------------------------------


def address_class(address: IPAddress) -> str:
    """``public``, ``loopback``, ``link-local``, ``private``, ``multicast``,
    ``unspecified`` or ``reserved`` (anything else that is not global)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_global:
        return "public"
    if address.is_private:
        return "private"
    return "reserved"


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self) -> None:
        self.done: defer.Deferred[list[IPAddress]] = defer.Deferred()
        self.addresses: list[IPAddress] = []

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        parsed = _literal(address.host)
        if parsed is not None and parsed not in self.addresses:
            self.addresses.append(parsed)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


async def resolve(resolver: IHostnameResolver, host: str, port: int) -> list[IPAddress]:
    """The addresses *host* resolves to (an IP address resolves to itself)."""
    literal = _literal(host)
    if literal is not None:
        return [literal]
    collect = _Collect()
    resolver.resolveHostName(collect, host, port)
    return await collect.done


class AddressPolicy:
    """Which addresses the connections of one upstream may go to.

    The configured hosts are the upstream's URL and those of its mirrors;
    any other host must be public, or of a kind of address one of them is on.
    """

    def __init__(
        self, upstream: str, configured_urls: list[str], resolver: IHostnameResolver
    ) -> None:
        self.upstream = upstream
        self._configured: list[tuple[str, int]] = []
        for url in configured_urls:
            self._configured.append((_host(url), URI.fromBytes(url.encode("ascii")).port))
        self.configured_hosts = {host for host, _ in self._configured}
        self._resolver = resolver

    async def check(self, host: str, address: IPAddress) -> None:
        """Raise :class:`DisallowedAddress` unless *host* may be reached at *address*."""
        if host.lower() in self.configured_hosts:
            return
        kind = address_class(address)
        if kind == "public":
            return
        if kind != "multicast":
            for configured, port in self._configured:
                addresses = await resolve(self._resolver, configured, port)
                if kind in {address_class(a) for a in addresses}:
                    return
        raise DisallowedAddress(
            string=f"{host} is at {kind} address {address}, which upstream {self.upstream}"
            f" may not reach (none of its configured hosts"
            f" {', '.join(sorted(self.configured_hosts))} is)"
        )

    async def check_every_address(self, host: str, port: int) -> None:
        """Check all the addresses of *host*, for a connection made by a proxy.

        The proxy may connect to any of them, so each must be allowed; a host
        that does not resolve here cannot be checked, and is refused.
        """
        if host.lower() in self.configured_hosts:
            return
        addresses = await resolve(self._resolver, host, port)
        if not addresses:
            raise DisallowedAddress(
                string=f"{host} does not resolve here, so upstream {self.upstream}"
                " cannot check where a proxy would connect"
            )
        for address in addresses:
            await self.check(host, address)


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    """A TCP endpoint that connects only to addresses its :class:`AddressPolicy` allows."""

    def __init__(
        self,
        reactor: Any,
        resolver: IHostnameResolver,
        policy: AddressPolicy,
        host: str,
        port: int,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._reactor = reactor
        self._resolver = resolver
        self._policy = policy
        self._host = host
        self._port = port

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        addresses = await resolve(self._resolver, self._host, self._port)
        if not addresses:
            raise ConnectError(string=f"{self._host} does not resolve to any address")
        refused: DisallowedAddress | None = None
        tried = 0
        error: Exception | None = None
        for address in addresses:
            try:
                await self._policy.check(self._host, address)
            except DisallowedAddress as e:
                refused = refused or e
                continue
            endpoint_type = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
            endpoint = endpoint_type(self._reactor, str(address), self._port, self._connect_timeout)
            try:
                return await endpoint.connect(factory)
            except ConnectError as e:
                error = e
            tried += 1
            if tried == ADDRESSES_TRIED:
                break
        if error is not None:
            raise error
        assert refused is not None
        raise refused


# --- TLS ---------------------------------------------------------------------------


class _SystemAndExtra(ssl.OpenSSLDefaultPaths):
    """The system's trusted CAs, and the certificates of the upstream's ``ca`` file."""

    def __init__(self, certificates: list[crypto.X509]) -> None:
        self._certificates = certificates

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        assert store is not None
        for certificate in self._certificates:
            store.add_cert(certificate)


@dataclass(frozen=True)
class UpstreamTLS:
    """What one upstream's TLS connections trust, and the certificate they present."""

    ca: str | None = None
    ca_certificates: list[crypto.X509] = field(default_factory=list)
    client: ssl.PrivateCertificate | None = None
    client_chain: list[crypto.X509] = field(default_factory=list)

    @property
    def trusted(self) -> str:
        """The trust store, as the log and error messages name it."""
        return "the system's CAs" + (f" and {self.ca}" if self.ca else "")

    def without_client(self) -> UpstreamTLS:
        """The same trust, presenting no client certificate."""
        return UpstreamTLS(self.ca, self.ca_certificates)

    def creator(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        trust = _SystemAndExtra(self.ca_certificates) if self.ca_certificates else None
        options: dict[str, Any] = {}
        if self.client_chain:
            options["extraCertChain"] = self.client_chain
        return ssl.optionsForClientTLS(
            hostname,
            trustRoot=trust,
            clientCertificate=self.client,
            extraCertificateOptions=options,
        )


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{key}: {path}: cannot read: {e.strerror}") from None


def _certificates(key: str, path: str) -> list[crypto.X509]:
    certificates = []
    for pem in _PEM_CERT.findall(_read(key, path)):
        try:
            certificates.append(crypto.load_certificate(crypto.FILETYPE_PEM, pem))
        except crypto.Error:
            raise ValueError(f"{key}: {path}: a certificate in it cannot be parsed") from None
    if not certificates:
        raise ValueError(f"{key}: {path}: no PEM certificate found")
    return certificates


def load_upstream_tls(
    ca: str | None, client_cert: str | None, client_key: str | None
) -> UpstreamTLS:
    """Read and check an upstream's ``ca``, ``client_cert`` and ``client_key`` files.

    ValueError names the key and the file that cannot be used.
    """
    ca_certificates = _certificates("ca", ca) if ca else []
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert: client_cert and client_key go together")
    if client_cert is None or client_key is None:
        return UpstreamTLS(ca, ca_certificates)
    chain = _certificates("client_cert", client_cert)
    key_pem = _read("client_key", client_key)
    try:
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
    except crypto.Error:
        raise ValueError(f"client_key: {client_key}: not a PEM private key") from None
    leaf = ssl.Certificate(chain[0])
    try:
        client = ssl.PrivateCertificate.fromCertificateAndKeyPair(leaf, key)
    except VerifyError:
        raise ValueError(
            f"client_key: {client_key} is not the key of the certificate in {client_cert}"
        ) from None
    return UpstreamTLS(ca, ca_certificates, client, chain[1:])


def tls_failure(error: Exception) -> str | None:
    """Why a TLS handshake failed, if that is what *error* (a treq failure) is about.

    It may quote the names of the peer's certificate: it is shortened to be logged.
    """
    reasons = getattr(error, "reasons", None) or []
    for reason in reasons:
        value = reason.value
        if isinstance(value, VerificationError):
            return printable(f"certificate does not match the host name ({value})")
        if isinstance(value, SSL.Error):
            entries = value.args[0] if value.args and isinstance(value.args[0], list) else []
            details = [str(e[-1]) for e in entries if isinstance(e, tuple) and e and e[-1]]
            return printable("TLS handshake failed: " + (", ".join(details) or str(value)))
    return None


# --- the client -------------------------------------------------------------------


class _QuietClientFactory(_HTTP11ClientFactory):
    """Upstream connections come and go; don't log each one."""

    noisy = False


def _host(url: str) -> str:
    return URI.fromBytes(url.encode("ascii")).host.decode("ascii").lower()


def _origin(uri: URI) -> tuple[str, str, int]:
    """The scheme, host (lower case) and port of *uri*."""
    return uri.scheme.decode("ascii").lower(), uri.host.decode("ascii").lower(), uri.port


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Each connection's endpoint: direct or through a proxy, TLS to the target host.

    The client certificate is the primary's credential: only a TLS connection
    to the origin of the configured URL (scheme, host and port) presents it.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IHostnameResolver,
        policy: AddressPolicy,
        tls: UpstreamTLS,
        proxies: ProxyRules,
        origin: tuple[str, str, int],
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._policy = policy
        self._tls = tls
        self._anonymous_tls = tls.without_client()
        self._proxies = proxies
        self._origin = origin
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        scheme = uri.scheme.decode("ascii")
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        proxy = self._proxies.for_target(scheme, host, uri.port)
        endpoint: IStreamClientEndpoint
        if proxy is not None:
            policy, port = self._policy, uri.port
            endpoint = TunnelEndpoint(
                self._reactor,
                proxy,
                host,
                port,
                lambda: policy.check_every_address(host, port),
                self._connect_timeout,
            )
        else:
            endpoint = GuardedEndpoint(
                self._reactor, self._resolver, self._policy, host, uri.port, self._connect_timeout
            )
        if scheme == "https":
            return wrapClientTLS(self.tls_for(uri).creator(host), endpoint)
        return endpoint

    def tls_for(self, uri: URI) -> UpstreamTLS:
        """The TLS settings for *uri*: with the client certificate only at the origin."""
        if _origin(uri) == self._origin:
            return self._tls
        return self._anonymous_tls


@dataclass
class Egress:
    """The HTTP client, pool and TLS settings of one upstream."""

    http: HTTPClient
    pool: HTTPConnectionPool
    tls: UpstreamTLS


def upstream_egress(
    reactor: Any,
    upstream: str,
    configured_url: str,
    tls: UpstreamTLS,
    resolver: IHostnameResolver | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    *,
    mirror_urls: tuple[str, ...] = (),
    proxies: ProxyRules | None = None,
) -> Egress:
    """A client for *upstream*, whose connections follow its :class:`AddressPolicy`.

    *connect_timeout* bounds each connection attempt, per address tried.
    """
    resolver = resolver if resolver is not None else reactor.nameResolver
    proxies = proxies if proxies is not None else ProxyRules()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = POOL_PER_HOST
    if tls.ca is not None or tls.client is not None:
        log.info(
            "upstream {upstream}: TLS trusts {trusted}{client}",
            upstream=upstream,
            trusted=tls.trusted,
            client=", with a client certificate" if tls.client is not None else "",
        )
    if proxies.http is not None or proxies.https is not None:
        log.info(
            "upstream {upstream}: connections go {proxies}",
            upstream=upstream,
            proxies=proxies.describe(),
        )
    policy = AddressPolicy(upstream, [configured_url, *mirror_urls], resolver)
    origin = _origin(URI.fromBytes(configured_url.encode("ascii")))
    endpoints = _Endpoints(reactor, resolver, policy, tls, proxies, origin, connect_timeout)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool)
    return Egress(HTTPClient(agent), pool, tls)
