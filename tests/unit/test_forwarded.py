import pytest
from twisted.web.http_headers import Headers

from dockmirror.forwarded import ClientAddresses, parse_node

PROXIES = ["10.0.0.0/8", "2001:db8:ffff::/48"]


def xff(*values: str) -> Headers:
    return Headers({"X-Forwarded-For": list(values)})


def forwarded(*values: str) -> Headers:
    return Headers({"Forwarded": list(values)})


def test_untrusted_peer_is_the_client() -> None:
    clients = ClientAddresses(PROXIES)
    assert clients.client("192.0.2.1", xff("198.51.100.7")) == "192.0.2.1"
    assert ClientAddresses().client("10.0.0.1", xff("198.51.100.7")) == "10.0.0.1"


def test_right_most_untrusted_hop() -> None:
    clients = ClientAddresses(PROXIES)
    assert clients.client("10.0.0.1", xff("198.51.100.7")) == "198.51.100.7"
    # What the client wrote itself stays on the left and is not read.
    assert clients.client("10.0.0.1", xff("6.6.6.6, 198.51.100.7")) == "198.51.100.7"
    assert clients.client("10.0.0.1", xff("6.6.6.6", "198.51.100.7, 10.1.1.1")) == "198.51.100.7"
    assert clients.client("::ffff:10.0.0.1", xff("2001:db8::5")) == "2001:db8::5"
    assert clients.client("2001:db8:ffff::1", xff("[2001:db8::5]:443")) == "2001:db8::5"
    # Every hop trusted: the left-most one.
    assert clients.client("10.0.0.1", xff("10.2.2.2, 10.3.3.3")) == "10.2.2.2"
    # No header: the proxy itself.
    assert clients.client("10.0.0.1", Headers()) == "10.0.0.1"


def test_malformed_hops_stop_at_the_nearest_trusted_one() -> None:
    clients = ClientAddresses(PROXIES)
    for value in ("nonsense", "198.51.100.7 junk", "", "fe80::1%eth0", "1.2.3.4:99999"):
        assert clients.client("10.0.0.1", xff(value)) == "10.0.0.1", value
    assert clients.client("10.0.0.1", xff("198.51.100.7, 10.9.9.9, bad")) == "10.0.0.1"
    assert clients.client("10.0.0.1", xff("bad, 10.9.9.9")) == "10.9.9.9"
    # The chain is read from the right, at most 16 hops.
    long_chain = ", ".join(["10.1.1.1"] * 40)
    assert clients.client("10.0.0.1", xff("198.51.100.7, " + long_chain)) == "10.1.1.1"


def test_only_the_configured_header_is_read() -> None:
    by_xff = ClientAddresses(PROXIES)
    by_forwarded = ClientAddresses(PROXIES, "Forwarded")
    both = Headers({"X-Forwarded-For": ["198.51.100.7"], "Forwarded": ["for=203.0.113.9"]})
    assert by_xff.client("10.0.0.1", both) == "198.51.100.7"
    assert by_forwarded.client("10.0.0.1", both) == "203.0.113.9"


def test_forwarded_header() -> None:
    clients = ClientAddresses(PROXIES, "forwarded")
    value = 'for=6.6.6.6, for="[2001:db8::17]:4711";proto=https;by=10.0.0.1'
    assert clients.client("10.0.0.1", forwarded(value)) == "2001:db8::17"
    assert clients.client("10.0.0.1", forwarded("For=192.0.2.60;proto=http")) == "192.0.2.60"
    for bad in ("for=unknown", "for=_hidden", 'for="1.2.3.4', "proto=https", "for=1.2.3.4;x"):
        assert clients.client("10.0.0.1", forwarded(bad)) == "10.0.0.1", bad


def test_parse_node() -> None:
    assert str(parse_node(" 192.0.2.1:8080 ")) == "192.0.2.1"
    assert str(parse_node("::ffff:192.0.2.1")) == "192.0.2.1"
    assert parse_node("[192.0.2.1]") is None
    assert parse_node("example.com") is None


def test_unknown_header_is_refused() -> None:
    with pytest.raises(ValueError):
        ClientAddresses(PROXIES, "X-Real-IP")
