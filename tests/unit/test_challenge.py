import pytest

from dockmirror.upstream import (
    Challenge,
    may_send_credentials,
    parse_www_authenticate,
)


def test_docker_hub_challenge() -> None:
    value = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull"'
    )
    assert parse_www_authenticate([value]) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/nginx:pull",
            },
        )
    ]


def test_parameters_in_any_order_and_unquoted() -> None:
    [c] = parse_www_authenticate(['bearer service=ghcr.io, realm="https://ghcr.io/token"'])
    assert c.scheme == "bearer"
    assert c.params == {"service": "ghcr.io", "realm": "https://ghcr.io/token"}


def test_several_challenges_in_one_value() -> None:
    value = 'Basic realm="Registry Realm", Bearer realm="https://a/t",service="s", error="x"'
    assert parse_www_authenticate([value]) == [
        Challenge("basic", {"realm": "Registry Realm"}),
        Challenge("bearer", {"realm": "https://a/t", "service": "s", "error": "x"}),
    ]


def test_several_header_values_and_escapes() -> None:
    values = ["Negotiate abc123==", 'Bearer realm="https://a/t?x=\\"y\\"" , scope="a,b"']
    assert parse_www_authenticate(values) == [
        Challenge("negotiate", {}),
        Challenge("bearer", {"realm": 'https://a/t?x="y"', "scope": "a,b"}),
    ]


@pytest.mark.parametrize(
    ("value", "challenges"),
    [
        ("", []),
        ("   ", []),
        (",,", []),
        ('"', []),
        ("Bearer realm=", [Challenge("bearer", {})]),
        ('Bearer realm="unterminated', [Challenge("bearer", {})]),
    ],
)
def test_garbage_is_no_challenge(value: str, challenges: list[Challenge]) -> None:
    assert parse_www_authenticate([value]) == challenges


HUB_REALMS = ("https://auth.docker.io",)


@pytest.mark.parametrize(
    ("realm", "registry", "realms", "allowed"),
    [
        ("https://auth.docker.io/token", "https://registry-1.docker.io", HUB_REALMS, True),
        ("https://AUTH.docker.io:443/token", "https://registry-1.docker.io", HUB_REALMS, True),
        ("https://auth.docker.io/token", "https://registry-1.docker.io", (), False),
        ("https://auth.docker.io:8443/token", "https://registry-1.docker.io", HUB_REALMS, False),
        ("http://auth.docker.io/token", "https://registry-1.docker.io", HUB_REALMS, False),
        ("https://evil.docker.io/token", "https://registry-1.docker.io", HUB_REALMS, False),
        ("https://ghcr.io/token", "https://ghcr.io", (), True),
        ("http://127.0.0.1:5000/token", "http://127.0.0.1:5000", (), True),
        ("https://ghcr.io:443/token", "https://ghcr.io", (), True),
        # Another port or scheme of the registry's host is another origin.
        ("http://127.0.0.1:5001/token", "http://127.0.0.1:5000", (), False),
        ("http://127.0.0.1:5001/token", "http://127.0.0.1:5000", ("http://127.0.0.1:5001",), True),
        ("https://ghcr.io:8443/token", "https://ghcr.io", (), False),
        ("http://ghcr.io/token", "https://ghcr.io", (), False),
        ("https://r.example/token", "http://r.example", (), False),
        ("http://r.example:443/token", "https://r.example", (), False),
        ("http://127.0.0.2:5001/token", "http://127.0.0.1:5000", (), False),
        ("https://evil.example/token", "https://ghcr.io", (), False),
        ("https://localhost/token", "https://otherhost", (), False),
        # Tenants of one registry domain, and co.uk-style suffixes, are other parties.
        ("https://other.azurecr.io/oauth2/token", "https://mine.azurecr.io", (), False),
        ("https://auth.other.co.uk/token", "https://registry.mine.co.uk", (), False),
        (
            "https://auth.example.co.uk/t",
            "https://r.example.co.uk",
            ("https://auth.example.co.uk",),
            True,
        ),
        ("https:///token", "https://ghcr.io", (), False),
        ("https://ghcr.io:99999/token", "https://ghcr.io", (), False),
    ],
)
def test_credentials_only_to_the_registry_host_and_listed_realms(
    realm: str, registry: str, realms: tuple[str, ...], allowed: bool
) -> None:
    assert may_send_credentials(realm, registry, realms) is allowed
