"""Upstream connections through a real HTTP proxy (tinyproxy) on loopback.

The upstream is a TLS registry with its own CA: through the proxy, TLS runs
inside a ``CONNECT`` tunnel and the registry's certificate is checked as for
a direct connection.  A plain-HTTP registry goes through a tunnel as well.
"""

from __future__ import annotations

import json
import shutil

import pytest

from .images import make_image, pull, push
from .registries import LOOPBACK, free_port, wait_until
from .test_pull import assert_pulled, curl, error_code
from .upstream_servers import Relay, Tinyproxy, make_pki, redirect

pytestmark = pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="needs tinyproxy")

CREDENTIALS = ("proxyuser", "pr0xy-s3cret")


@pytest.fixture
def proxy(tls_registry, tmp_path_factory):
    with Tinyproxy(tmp_path_factory.mktemp("tinyproxy"), (tls_registry.port,)) as p:
        yield p


def _corp(registry, pki, **keys: object) -> dict[str, dict[str, object]]:
    table = {"plugin": "registry", "url": registry.url, "default": True, "ca": str(pki.ca)}
    return {"corp": {**table, **keys}}


def _error(mirror, repo: str) -> str:
    status, _, body = curl(f"{mirror.url}/v2/{repo}/manifests/v1")
    assert (status, error_code(body)) == (502, "UNAVAILABLE"), body
    return str(json.loads(body)["errors"][0]["message"])


def test_pulls_go_through_the_proxy_with_connect(
    tls_registry, pki, proxy, dockmirror, seeded, unique_repo, tmp_path
):
    image = seeded(tls_registry, unique_repo, "v1")
    mirror = dockmirror(_corp(tls_registry, pki, proxy=proxy.url))
    pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "out")
    assert_pulled(tmp_path / "out", image)
    assert proxy.connects(tls_registry.host) >= 1
    assert f"upstream corp: connections go through {proxy.url} (config)" in mirror.log_text()
    assert "Traceback" not in mirror.log_text()


def test_the_environment_names_the_proxy_and_no_proxy_bypasses_it(
    tls_registry, pki, proxy, dockmirror, seeded, unique_repo, tmp_path
):
    image = seeded(tls_registry, unique_repo, "v1")
    through = dockmirror(_corp(tls_registry, pki), env={"HTTPS_PROXY": proxy.url})
    pull(f"{through.host}/{unique_repo}:v1", tmp_path / "through")
    assert_pulled(tmp_path / "through", image)
    tunnels = proxy.connects(tls_registry.host)
    assert tunnels >= 1

    for no_proxy in (LOOPBACK, "127.0.0.0/8", f"example.com,{LOOPBACK}:{tls_registry.port}"):
        bypass = dockmirror(
            _corp(tls_registry, pki), env={"https_proxy": proxy.url, "NO_PROXY": no_proxy}
        )
        pull(f"{bypass.host}/{unique_repo}:v1", tmp_path / f"bypass-{free_port()}")
        assert proxy.connects(tls_registry.host) == tunnels, no_proxy
    # proxy = "none" ignores the environment.
    direct = dockmirror(_corp(tls_registry, pki, proxy="none"), env={"HTTPS_PROXY": proxy.url})
    pull(f"{direct.host}/{unique_repo}:v1", tmp_path / "direct")
    assert proxy.connects(tls_registry.host) == tunnels


def test_a_proxy_that_is_down_is_named_in_the_error(
    tls_registry, pki, dockmirror, seeded, unique_repo
):
    seeded(tls_registry, unique_repo, "v1")
    dead = f"http://{LOOPBACK}:{free_port()}"
    mirror = dockmirror(_corp(tls_registry, pki, proxy=dead))
    message = _error(mirror, unique_repo)
    assert f"proxy {dead} cannot be reached" in message, message
    assert "Traceback" not in mirror.log_text()


def test_proxy_authentication(
    tls_registry, pki, dockmirror, seeded, unique_repo, tmp_path, tmp_path_factory
):
    image = seeded(tls_registry, unique_repo, "v1")
    with Tinyproxy(
        tmp_path_factory.mktemp("tinyproxy-auth"), (tls_registry.port,), CREDENTIALS
    ) as proxy:
        without = dockmirror(_corp(tls_registry, pki, proxy=proxy.url))
        message = _error(without, unique_repo)
        assert f"proxy {proxy.url}: refused CONNECT to {tls_registry.host}" in message, message
        assert "407" in message

        user, password = CREDENTIALS
        in_url = f"http://{user}:{password}@{LOOPBACK}:{proxy.port}"
        for keys in (
            {"proxy": proxy.url, "proxy_username": user, "proxy_password": password},
            {"proxy": in_url},
        ):
            mirror = dockmirror(_corp(tls_registry, pki, **keys))
            out = tmp_path / f"out-{free_port()}"
            pull(f"{mirror.host}/{unique_repo}:v1", out)
            assert_pulled(out, image)
            wait_until(lambda m=mirror: "connections go through" in m.log_text())
            assert password not in mirror.log_text()

        wrong = dockmirror(
            _corp(tls_registry, pki, proxy=f"http://{user}:nope@{LOOPBACK}:{proxy.port}")
        )
        assert "401 Unauthorized" in _error(wrong, unique_repo)  # tinyproxy's answer
        assert "nope" not in wrong.log_text()
    for m in (without, mirror, wrong):
        assert "Traceback" not in m.log_text()


def test_a_proxy_that_refuses_the_port_is_named(
    tls_registry, pki, dockmirror, seeded, unique_repo, tmp_path_factory
):
    seeded(tls_registry, unique_repo, "v1")
    with Tinyproxy(tmp_path_factory.mktemp("tinyproxy-ports"), (1,)) as proxy:
        mirror = dockmirror(_corp(tls_registry, pki, proxy=proxy.url))
        message = _error(mirror, unique_repo)
    assert f"proxy {proxy.url}: refused CONNECT" in message and "403" in message, message


def test_tls_through_the_proxy_is_verified_end_to_end(
    tls_registry, proxy, dockmirror, seeded, unique_repo, tmp_path
):
    seeded(tls_registry, unique_repo, "v1")
    other = make_pki(tmp_path / "other-ca", "another CA")
    mirror = dockmirror(_corp(tls_registry, other, proxy=proxy.url))
    assert "certificate verify failed" in _error(mirror, unique_repo)
    assert proxy.connects(tls_registry.host) >= 1


def test_redirects_to_a_cdn_follow_the_same_proxy_rules(
    plain_registry, tls_registry, pki, dockmirror, unique_repo, tmp_path, tmp_path_factory
):
    """A plain-HTTP registry whose blobs redirect to a TLS "CDN" on another host name."""
    layout = tmp_path_factory.mktemp("layout")
    image = make_image(layout, "v1")
    for registry in (plain_registry, tls_registry):
        push(layout, "v1", registry.host, unique_repo, registry.creds)
    cdn = f"localhost:{tls_registry.port}"
    behaviours = {f"{unique_repo}/blobs/": redirect(lambda r: f"https://{cdn}{r.path}")}
    with (
        Relay(plain_registry.url, behaviours) as relay,
        Tinyproxy(tmp_path_factory.mktemp("tinyproxy"), (relay.port, tls_registry.port)) as proxy,
    ):
        corp = {"plugin": "registry", "url": relay.url, "default": True, "ca": str(pki.ca)}
        mirror = dockmirror({"corp": {**corp, "proxy": proxy.url}})
        pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "through")
        assert_pulled(tmp_path / "through", image)
        assert proxy.connects(f"{LOOPBACK}:{relay.port}") >= 1
        assert proxy.connects(cdn) >= 1
        blob_gets = f"GET /v2/{unique_repo}/blobs/"
        # (the TLS registry's log barrier cannot be used: urllib does not trust its CA)
        wait_until(lambda: tls_registry.log_text().count(blob_gets) == len(image.blobs))

        # The CDN's host is in no_proxy: the registry through the proxy, the CDN direct.
        tunnels = proxy.connects(cdn)
        split = dockmirror({"corp": {**corp, "proxy": proxy.url, "no_proxy": ["localhost"]}})
        pull(f"{split.host}/{unique_repo}:v1", tmp_path / "split")
        assert_pulled(tmp_path / "split", image)
        assert proxy.connects(cdn) == tunnels
        wait_until(lambda: tls_registry.log_text().count(blob_gets) == 2 * len(image.blobs))


def test_fallback_endpoints_go_through_the_proxy_too(
    registry_factory, dockmirror, unique_repo, tmp_path, tmp_path_factory
):
    primary, backup = registry_factory(), registry_factory()
    layout = tmp_path_factory.mktemp("layout")
    image = make_image(layout, "v1")
    for registry in (primary, backup):
        push(layout, "v1", registry.host, unique_repo, registry.creds)
    primary.stop()
    with Tinyproxy(tmp_path_factory.mktemp("tinyproxy"), (primary.port, backup.port)) as proxy:
        mirror = dockmirror(
            {
                "hub": {
                    "plugin": "dockerhub",
                    "url": primary.url,
                    "default": True,
                    "mirrors": [{"url": backup.url, "trust_tags": True}],
                    "proxy": proxy.url,
                }
            }
        )
        pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "out")
        assert_pulled(tmp_path / "out", image)
        assert proxy.connects(primary.host) >= 1  # tried: the proxy cannot reach it
        assert proxy.connects(backup.host) >= 1
