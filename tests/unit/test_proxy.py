"""Which connections go through a proxy, and the CONNECT tunnel's handshake."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dockmirror.proxy import (
    REPLY_LIMIT,
    REPLY_TIMEOUT,
    NoProxy,
    Proxy,
    ProxyError,
    _Tunnel,
    parse_proxy,
    proxy_rules,
    redact,
)


def rules(environ: dict[str, str], setting: str | None = None, no_proxy: tuple[str, ...] = ()):
    return proxy_rules(setting, None, None, no_proxy, environ)


def test_the_environment_names_a_proxy_per_scheme() -> None:
    r = rules({"HTTPS_PROXY": "http://secure:3128", "http_proxy": "plain:8080"})
    assert r.for_target("https", "registry.example", 443) == Proxy("secure", 3128)
    assert r.for_target("http", "registry.example", 80) == Proxy("plain", 8080)
    assert r.source == "environment"


def test_upper_case_wins_as_in_go() -> None:
    r = rules({"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"})
    assert r.for_target("https", "r.example", 443) == Proxy("upper", 1)


def test_no_environment_means_direct() -> None:
    assert rules({}).for_target("https", "r.example", 443) is None


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "registry.example.com", 443, True),
        (".example.com", "registry.example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        ("*", "anything.test", 443, True),
        ("10.0.0.0/8", "10.1.2.3", 443, True),
        ("10.0.0.0/8", "11.1.2.3", 443, False),
        ("127.0.0.1", "127.0.0.1", 5000, True),
        ("::1", "::1", 443, True),
        ("[::1]:5000", "::1", 5000, True),
        ("[::1]:5000", "::1", 443, False),
        ("example.com:8443", "example.com", 8443, True),
        ("example.com:8443", "example.com", 443, False),
        (" other.test , EXAMPLE.com ", "example.com", 443, True),
        ("bad host!, example.com", "example.com", 443, True),
    ],
)
def test_no_proxy_by_suffix_address_cidr_and_port(
    no_proxy: str, host: str, port: int, bypassed: bool
) -> None:
    r = rules({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": no_proxy})
    assert (r.for_target("https", host, port) is None) is bypassed


def test_the_config_key_overrides_the_environment() -> None:
    environ = {"HTTPS_PROXY": "http://env:1", "NO_PROXY": "*"}
    r = rules(environ, "http://conf:3128", ("internal.example",))
    assert r.for_target("https", "r.example", 443) == Proxy("conf", 3128)
    assert r.for_target("http", "r.example", 80) == Proxy("conf", 3128)
    assert r.for_target("https", "internal.example", 443) is None
    assert rules(environ, "none").for_target("https", "r.example", 443) is None


def test_credentials_from_the_url_or_the_keys() -> None:
    assert parse_proxy("http://u%40x:p%3Aw@p:3128").authorization == "Basic dUB4OnA6dw=="
    assert parse_proxy("http://p:3128", "u", "pw") == Proxy("p", 3128, "u", "pw")
    with pytest.raises(ValueError, match="not both"):
        parse_proxy("http://u:p@p:3128", "u", "pw")


@pytest.mark.parametrize(
    "url", ["https://p:3128", "socks5://p:1080", "http://p:99999", "http://:3128", "http://p/x"]
)
def test_unusable_proxy_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_proxy(url)


def test_passwords_are_never_shown() -> None:
    proxy = parse_proxy("http://user:hunter2@p:3128")
    assert "hunter2" not in repr(proxy) and "hunter2" not in proxy.name
    assert redact("http://user:hunter2@p:3128") == "http://user:***@p:3128"
    with pytest.raises(ValueError) as info:
        proxy_rules("http://user:hunter2@p:port", None, None, (), {})
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError) as info:
        proxy_rules(None, None, None, (), {"HTTPS_PROXY": "ftp://user:hunter2@p"})
    assert "hunter2" not in str(info.value) and "HTTPS_PROXY" in str(info.value)


def test_no_proxy_entries_that_cannot_be_read_are_ignored() -> None:
    assert NoProxy.parse("bad host!") is None
    assert NoProxy.parse("host:port") is None


# --- the tunnel ---------------------------------------------------------------------


class Inner(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def tunnel(proxy: Proxy = Proxy("proxy.test", 3128, "user", "hunter2")) -> Any:
    clock = MemoryReactorClock()
    inner = Inner()
    t = _Tunnel(proxy, "registry.test:443", Factory.forProtocol(lambda: inner), clock)
    transport = StringTransport()
    t.makeConnection(transport)
    results: list[Any] = []
    t.ready.addBoth(results.append)
    return t, transport, inner, results, clock


def test_connect_is_sent_with_the_proxy_credentials() -> None:
    t, transport, inner, results, _ = tunnel()
    assert transport.value() == (
        b"CONNECT registry.test:443 HTTP/1.1\r\nHost: registry.test:443\r\n"
        b"Proxy-Authorization: Basic dXNlcjpodW50ZXIy\r\n\r\n"
    )
    t.dataReceived(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nTLS hello")
    assert results == [inner]
    assert inner.received == b"TLS hello"
    t.dataReceived(b" more")
    assert inner.received == b"TLS hello more"


@pytest.mark.parametrize("status", [407, 403, 502])
def test_a_refusal_names_the_proxy_and_never_its_credentials(status: int) -> None:
    t, transport, inner, results, _ = tunnel()
    t.dataReceived(f"HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\n\r\n".encode())
    [failure] = results
    assert isinstance(failure.value, ProxyError)
    message = str(failure.value)
    assert "http://proxy.test:3128" in message and str(status) in message
    assert "hunter2" not in message and "dXNlcjpodW50ZXIy" not in message
    assert transport.disconnecting
    assert inner.received == b""


def test_an_endless_or_missing_reply_fails() -> None:
    t, _, _, results, _ = tunnel()
    t.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (REPLY_LIMIT // 6))
    assert isinstance(results[0].value, ProxyError)
    t, _, _, results, clock = tunnel()
    clock.advance(REPLY_TIMEOUT)
    assert "no answer" in str(results[0].value)


def test_a_proxy_closing_before_answering_is_a_proxy_error() -> None:
    t, _, _, results, clock = tunnel()
    t.connectionLost(Failure(ConnectionError()))
    assert "closed the connection" in str(results[0].value)
    assert not clock.getDelayedCalls()
