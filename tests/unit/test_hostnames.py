"""The host-name grammar that every client-given registry name passes before matching."""

from __future__ import annotations

import pytest

from dockmirror.hostnames import HostName, HostPattern, parse_host, parse_host_header

GCR = HostPattern.parse("*.gcr.io")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("gcr.io", HostName("gcr.io")),
        ("us.gcr.io", HostName("us.gcr.io")),
        ("Registry-1.Docker.IO", HostName("registry-1.docker.io")),
        ("registry.corp:5000", HostName("registry.corp", 5000)),
        ("localhost", HostName("localhost")),
        ("a" * 63 + ".io", HostName("a" * 63 + ".io")),
    ],
)
def test_host_names(text: str, parsed: HostName) -> None:
    assert parse_host(text) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1:9999#.gcr.io",
        "127.0.0.1:9999/.gcr.io",
        "127.0.0.1:9999?.gcr.io",
        "user@x.gcr.io",
        "x.gcr.io@127.0.0.1",
        "127.0.0.1",
        "127.0.0.1:9999",
        "[::1]:9999",
        "x%2egcr.io",
        "x.gcr.io.",
        ".gcr.io",
        "x..gcr.io",
        "-x.gcr.io",
        "x-.gcr.io",
        "x_y.gcr.io",
        "x.gcr.io:",
        "x.gcr.io:0",
        "x.gcr.io:65536",
        "x.gcr.io:08",
        "x.gcr.io:1:2",
        "x.gcr.io\t",
        " x.gcr.io",
        "a" * 64 + ".gcr.io",
        ("a" * 63 + ".") * 4 + "io",
        "\u212a8s.gcr.io",  # KELVIN SIGN, which str.lower() turns into "k"
        "x\uff0egcr.io",  # FULLWIDTH FULL STOP
        "x\u3002gcr.io",  # IDEOGRAPHIC FULL STOP, a dot to IDNA
        "xn--\u00e9.gcr.io",
        "127.0.0.1:9999\uff03.gcr.io",
    ],
)
def test_anything_else_is_not_a_host_name(text: str) -> None:
    assert parse_host(text) is None


def test_a_wildcard_matches_exactly_one_more_label() -> None:
    assert GCR.matches(HostName("us.gcr.io"))
    assert not GCR.matches(HostName("gcr.io"))
    assert not GCR.matches(HostName("a.b.gcr.io"))
    assert not GCR.matches(HostName("us.gcr.io", 443))
    assert not GCR.matches(HostName("usgcr.io"))
    assert not GCR.matches(HostName("us.gcr.io.evil.example"))


def test_a_port_matches_only_where_the_pattern_has_it() -> None:
    pattern = HostPattern.parse("registry.corp:5000")
    assert pattern.matches(HostName("registry.corp", 5000))
    assert not pattern.matches(HostName("registry.corp"))
    assert not pattern.matches(HostName("registry.corp", 5001))
    assert not HostPattern.parse("registry.corp").matches(HostName("registry.corp", 5000))


@pytest.mark.parametrize("text", ["*", "*.*.gcr.io", "gcr.*", "*gcr.io", "a_b.io", "1.2.3.4", ""])
def test_bad_patterns(text: str) -> None:
    with pytest.raises(ValueError, match="is not a host name"):
        HostPattern.parse(text)


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("ghcr.mirror.example.com", "ghcr.mirror.example.com"),
        ("GHCR.Mirror.example.com:443", "ghcr.mirror.example.com"),
        ("127.0.0.1:5000", "127.0.0.1"),
        ("[::1]:5000", "[::1]"),
        ("[0:0::1]", "[::1]"),
        ("mirror", "mirror"),
        ("a#b", None),
        ("mirror:", None),
        ("mirror:http", None),
        ("[::1", None),
        ("[::1]x", None),
        ("[evil]", None),
        ("1.2.3", None),
        ("mirror.example.com.", None),
        ("user@mirror", None),
        ("mirr\u00f6r", None),
    ],
)
def test_host_header(value: str, host: str | None) -> None:
    assert parse_host_header(value) == host
