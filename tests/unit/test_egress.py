"""Where an upstream's connections may go: checked on the resolved address, at connect time.

Everything runs on a MemoryReactorClock with a stub resolver: no connection
is ever made, the reactor only records where one would have gone.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import URI
from zope.interface import implementer

from dockmirror.egress import (
    AddressPolicy,
    DisallowedAddress,
    GuardedEndpoint,
    UpstreamTLS,
    _Endpoints,
    address_class,
    upstream_egress,
)
from dockmirror.proxy import proxy_rules

#: Stand-ins for public addresses; nothing is ever sent to them.
PUBLIC = "93.184.216.34"
PUBLIC_2 = "151.101.0.1"


@implementer(IHostnameResolver)
class StubResolver:
    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        self.asked.append(hostName)
        resolutionReceiver.resolutionBegan(None)
        for address in self.names.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolutionReceiver


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        (PUBLIC, "public"),
        ("2606:4700::1111", "public"),
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "reserved"),
    ],
)
def test_address_classes(address: str, kind: str) -> None:
    assert address_class(ipaddress.ip_address(address)) == kind


def connect(configured_url: str, names: dict[str, list[str]], host: str) -> tuple[list[str], Any]:
    """Connect to *host* for an upstream at *configured_url*: addresses dialled, and the result."""
    reactor = MemoryReactorClock()
    resolver = StubResolver(names)
    policy = AddressPolicy("corp", [configured_url], resolver)
    endpoint = GuardedEndpoint(reactor, resolver, policy, host, 443)
    results: list[Any] = []
    d: Deferred[Any] = endpoint.connect(Factory.forProtocol(Protocol))
    d.addBoth(results.append)
    return [client[0] for client in reactor.tcpClients], results


def refused(results: list[Any]) -> bool:
    return bool(results) and isinstance(results[0], Failure) and results[0].check(DisallowedAddress)


def test_the_configured_host_may_be_anywhere() -> None:
    dialled, _ = connect("https://registry.corp", {"registry.corp": ["10.0.0.5"]}, "registry.corp")
    assert dialled == ["10.0.0.5"]


def test_a_name_that_resolves_to_a_private_address_is_refused() -> None:
    names = {"registry.example": [PUBLIC], "cdn.example": ["10.0.0.7"]}
    dialled, results = connect("https://registry.example", names, "cdn.example")
    assert dialled == []
    assert refused(results)
    assert "private address 10.0.0.7" in str(results[0].value)


def test_only_the_allowed_addresses_of_a_name_are_dialled() -> None:
    names = {"registry.example": [PUBLIC], "cdn.example": ["169.254.169.254", PUBLIC_2]}
    dialled, _ = connect("https://registry.example", names, "cdn.example")
    assert dialled == [PUBLIC_2]


def test_a_public_upstream_reaches_public_hosts() -> None:
    names = {"registry.example": [PUBLIC], "cdn.example": [PUBLIC_2]}
    assert connect("https://registry.example", names, "cdn.example")[0] == [PUBLIC_2]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("127.0.0.2", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("sneaky.example", False),
    ],
)
def test_a_loopback_upstream_may_send_the_mirror_to_loopback_only(host: str, allowed: bool) -> None:
    names = {"localhost": ["127.0.0.1"], "sneaky.example": ["169.254.169.254"]}
    dialled, results = connect("http://127.0.0.1:5000", names, host)
    assert bool(dialled) is allowed
    assert refused(results) is not allowed


def test_a_private_upstream_named_by_dns_may_send_the_mirror_to_its_network() -> None:
    names = {"registry.corp": ["10.0.0.5"], "blobs.corp": ["10.0.9.9"], "meta": ["169.254.169.254"]}
    assert connect("https://registry.corp", names, "blobs.corp")[0] == ["10.0.9.9"]
    assert refused(connect("https://registry.corp", names, "meta")[1])


def test_a_name_that_does_not_resolve_is_a_connect_error() -> None:
    dialled, results = connect("https://registry.example", {}, "nowhere.example")
    assert dialled == []
    assert isinstance(results[0], Failure) and "does not resolve" in str(results[0].value)


# --- through a proxy, and mirrors ----------------------------------------------------


def tunnel(
    configured_urls: list[str], names: dict[str, list[str]], host: str
) -> tuple[list[tuple[str, int]], Any]:
    """Connect to *host* through a proxy: where the mirror dialled, and the result.

    The memory reactor resolves the proxy's name (here an address) to 127.0.0.1.
    """
    reactor = MemoryReactorClock()
    resolver = StubResolver(names)
    policy = AddressPolicy("corp", configured_urls, resolver)
    endpoints = _Endpoints(
        reactor,
        resolver,
        policy,
        UpstreamTLS(),
        proxy_rules("http://10.9.9.9:3128", None, None, ("direct.example",), {}),
        ("https", "registry.example", 443),
    )
    endpoint = endpoints.endpointForURI(URI.fromBytes(f"http://{host}:5000/v2/".encode()))
    results: list[Any] = []
    endpoint.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
    return [(client[0], client[1]) for client in reactor.tcpClients], results


def test_through_a_proxy_every_address_of_the_target_is_checked() -> None:
    names = {"registry.example": [PUBLIC], "cdn.example": [PUBLIC_2, "10.0.0.7"]}
    dialled, results = tunnel(["https://registry.example"], names, "cdn.example")
    assert dialled == [] and refused(results)
    names["cdn.example"] = [PUBLIC_2]
    dialled, _ = tunnel(["https://registry.example"], names, "cdn.example")
    assert [port for _, port in dialled] == [3128]  # the proxy, wherever the operator put it


def test_through_a_proxy_a_target_that_does_not_resolve_here_is_refused() -> None:
    dialled, results = tunnel(["https://registry.example"], {}, "cdn.example")
    assert dialled == [] and refused(results)
    assert "cannot check where a proxy would connect" in str(results[0].value)


def test_through_a_proxy_the_configured_hosts_need_no_resolution() -> None:
    urls = ["https://registry.example", "https://mirror.example:5000"]
    for host in ("registry.example", "mirror.example"):
        assert [port for _, port in tunnel(urls, {}, host)[0]] == [3128]


def test_no_proxy_targets_are_dialled_directly_and_checked() -> None:
    names = {"registry.example": [PUBLIC], "direct.example": [PUBLIC_2]}
    dialled, _ = tunnel(["https://registry.example"], names, "direct.example")
    assert dialled == [(PUBLIC_2, 5000)]


def test_a_mirror_on_loopback_lets_redirects_reach_loopback() -> None:
    names = {"registry.example": [PUBLIC], "localhost": ["127.0.0.1"]}
    policy_urls = ["https://registry.example", "http://127.0.0.1:5000"]
    reactor = MemoryReactorClock()
    resolver = StubResolver(names)
    policy = AddressPolicy("corp", policy_urls, resolver)
    results: list[Any] = []
    GuardedEndpoint(reactor, resolver, policy, "localhost", 443).connect(
        Factory.forProtocol(Protocol)
    ).addBoth(results.append)
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.1"]
    assert refused(connect("https://registry.example", names, "localhost")[1])


def test_the_client_certificate_goes_only_to_the_configured_origin(tmp_path: Any) -> None:
    """Not to a mirror on the same host and another port, another scheme, or a redirect."""
    tls = UpstreamTLS(client=object())  # type: ignore[arg-type]
    egress = upstream_egress(
        MemoryReactorClock(),
        "corp",
        "https://Registry.example:5000",
        tls,
        StubResolver({}),
        mirror_urls=("https://registry.example:5001", "https://mirror.example"),
    )
    endpoints = egress.http._agent._endpointFactory  # type: ignore[attr-defined]

    def presents(url: str) -> bool:
        return endpoints.tls_for(URI.fromBytes(url.encode())).client is not None

    assert presents("https://registry.example:5000/v2/")
    assert presents("https://REGISTRY.example:5000/v2/x/blobs/sha256:00")
    for elsewhere in (
        "https://registry.example:5001/v2/",  # a mirror on the same host
        "https://registry.example/v2/",
        "http://registry.example:5000/v2/",
        "https://mirror.example/v2/",
        "https://cdn.example/blob",
    ):
        assert not presents(elsewhere), elsewhere
