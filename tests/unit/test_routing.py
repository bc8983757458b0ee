import pytest

from dockmirror import config as config_module
from dockmirror.errors import RegistryError
from dockmirror.routing import Router, build_router


def make_router(extra: str = "") -> Router:
    data = {
        "upstreams": {
            "hub": {"plugin": "dockerhub", "default": True, "url": "http://127.0.0.1:1"},
            "ghcr": {"plugin": "ghcr", "hosts": ["ghcr.mirror.example.com"]},
            "gcr": {"plugin": "gcr"},
            "corp": {
                "plugin": "registry",
                "url": "https://registry.corp.example/",
                "aliases": ["corp.example"],
            },
        }
    }
    config = config_module._build("test.toml", data)
    return build_router(config, config_module.upstream_plugins())


def route(router: Router, name: str, host: str | None = None, ns: str | None = None):
    r = router.route(name, host, ns)
    return r.upstream.name, r.base_url, r.repository


def test_default_upstream_gets_library_prefix() -> None:
    router = make_router()
    assert route(router, "nginx") == ("hub", "http://127.0.0.1:1", "library/nginx")
    assert route(router, "owner/app") == ("hub", "http://127.0.0.1:1", "owner/app")


def test_path_prefix() -> None:
    router = make_router()
    assert route(router, "ghcr.io/owner/img") == ("ghcr", "https://ghcr.io", "owner/img")
    assert route(router, "docker.io/nginx") == ("hub", "http://127.0.0.1:1", "library/nginx")
    assert route(router, "corp.example/team/app") == (
        "corp",
        "https://registry.corp.example",
        "team/app",
    )


def test_gcr_regional_hosts_are_their_own_registries() -> None:
    router = make_router()
    assert route(router, "us.gcr.io/p/img") == ("gcr", "https://us.gcr.io", "p/img")
    assert route(router, "k8s.gcr.io/pause") == ("gcr", "https://k8s.gcr.io", "pause")
    assert route(router, "gcr.io/p/img") == ("gcr", "https://gcr.io", "p/img")


def test_host_header_wins_over_everything() -> None:
    router = make_router()
    assert route(router, "owner/img", host="GHCR.mirror.example.com:443", ns="docker.io") == (
        "ghcr",
        "https://ghcr.io",
        "owner/img",
    )


def test_ns_parameter_wins_over_path_prefix() -> None:
    router = make_router()
    assert route(router, "library/alpine", ns="docker.io") == (
        "hub",
        "http://127.0.0.1:1",
        "library/alpine",
    )
    assert route(router, "ghcr.io/x", ns="docker.io")[0] == "hub"
    assert route(router, "owner/img", ns="ghcr.io") == ("ghcr", "https://ghcr.io", "owner/img")


def test_unknown_ns_is_an_error_not_a_fallback() -> None:
    with pytest.raises(RegistryError) as e:
        make_router().route("a/b", None, "evil.example")
    assert e.value.code == "NAME_UNKNOWN"


def test_a_lone_alias_is_a_repository_name() -> None:
    assert route(make_router(), "ghcr.io") == ("hub", "http://127.0.0.1:1", "library/ghcr.io")


def test_no_default_upstream() -> None:
    config = config_module._build("t.toml", {"upstreams": {"q": {"plugin": "quay"}}})
    router = build_router(config, config_module.upstream_plugins())
    assert route(router, "quay.io/a/b")[0] == "q"
    with pytest.raises(RegistryError) as e:
        router.route("a/b")
    assert e.value.code == "NAME_UNKNOWN"


def test_built_in_plugins_are_all_discovered() -> None:
    assert set(config_module.upstream_plugins()) >= {
        "dockerhub",
        "ghcr",
        "quay",
        "gcr",
        "k8s",
        "registry",
    }


@pytest.mark.parametrize(
    "ns",
    [
        "127.0.0.1:9999#.gcr.io",
        "127.0.0.1:9999/.gcr.io",
        "127.0.0.1:9999?.gcr.io",
        "x@127.0.0.1:9999/.gcr.io",
        "127.0.0.1:9999%23.gcr.io",
        "127.0.0.1:9999#.GCR.IO",
        "a.b.gcr.io",
        "us.gcr.io.",
        "us.gcr.io:443",
        "docker.io:443",
        "\u212a8s.gcr.io",
        "",
    ],
)
def test_an_ns_that_is_not_a_configured_host_name_is_refused(ns: str) -> None:
    with pytest.raises(RegistryError) as e:
        make_router().route("a/b", None, ns)
    assert e.value.code == "NAME_UNKNOWN"


def test_ns_is_case_insensitive() -> None:
    assert route(make_router(), "p/img", ns="US.GCR.IO") == ("gcr", "https://us.gcr.io", "p/img")


def test_a_path_prefix_that_is_not_one_label_more_is_a_repository_name() -> None:
    router = make_router()
    assert route(router, "a.b.gcr.io/p/img") == ("hub", "http://127.0.0.1:1", "a.b.gcr.io/p/img")
    assert route(router, "us.gcr.io/p/img")[1] == "https://us.gcr.io"


@pytest.mark.parametrize("host", ["a#b", "evil:port", "x@y", "[::1", "mirror.example."])
def test_a_host_header_that_is_not_a_host_is_refused(host: str) -> None:
    with pytest.raises(RegistryError) as e:
        make_router().route("a/b", host)
    assert e.value.code == "NAME_UNKNOWN"


def test_an_address_host_header_goes_on_to_other_rules() -> None:
    router = make_router()
    assert route(router, "owner/img", host="127.0.0.1:5000", ns="ghcr.io")[0] == "ghcr"
    assert route(router, "owner/img", host="[::1]:5000")[0] == "hub"


def test_an_alias_with_a_port_matches_only_that_port() -> None:
    config = config_module._build(
        "t.toml",
        {
            "upstreams": {
                "corp": {
                    "plugin": "registry",
                    "url": "https://registry.corp.example:5000",
                    "aliases": ["registry.corp.example:5000"],
                }
            }
        },
    )
    router = build_router(config, config_module.upstream_plugins())
    assert route(router, "a/b", ns="registry.corp.example:5000")[0] == "corp"
    for ns in ("registry.corp.example", "registry.corp.example:5001"):
        with pytest.raises(RegistryError):
            router.route("a/b", None, ns)
