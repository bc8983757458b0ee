"""What a client or an upstream can make the mirror connect to, trust and keep.

Against the real server: registry names that are not host names, upstream
redirects, bodies that are too large or cut short, upstreams with a private
CA or that require a client certificate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from .images import pull
from .registries import LOOPBACK, wait_until
from .test_pull import assert_pulled, curl, error_code
from .upstream_servers import Listener, Relay, TLSRegistry, make_pki, redirect

MANIFEST_LIMIT = 4 << 20


@pytest.fixture
def evil():
    """A loopback host that the mirror must never connect to."""
    with Listener() as listener:
        yield listener


def _ns_variants(port: int) -> list[str]:
    """``?ns=`` values (as sent, percent-encoded) that once led to 127.0.0.1:*port*."""
    target = f"{LOOPBACK}:{port}"
    fullwidth_stops = target.replace(".", "%E3%80%82")  # IDEOGRAPHIC FULL STOP
    return [
        f"{target}%23.gcr.io",  # the reported one: '#'
        f"{target}%2F.gcr.io",  # '/'
        f"{target}%3F.gcr.io",  # '?'
        f"x%40{target}%2F.gcr.io",  # '@'
        f"{target}%2523.gcr.io",  # a percent-escape that survives one decoding
        f"{target}%23.GCR.IO",  # upper case
        f"{target}%23.gcr.io.",  # trailing dot
        f"{target}%23x.gcr.io:443",  # a port the operator did not configure
        f"{target}%EF%BC%83.gcr.io",  # FULLWIDTH NUMBER SIGN
        f"{fullwidth_stops}%23.gcr.io",
    ]


def test_ns_never_picks_a_host(plain_registry, dockmirror, evil):
    mirror = dockmirror(
        {
            "hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True},
            # As in the default configuration: the alias picks the host.
            "gcr": {"plugin": "gcr", "username": "gcr-user", "password": "gcr-secret"},
        }
    )
    for ns in _ns_variants(evil.port):
        for path in ("p/img/manifests/latest", "p/img/blobs/sha256:" + "a" * 64, "p/tags/list"):
            status, _, body = curl(f"{mirror.url}/v2/{path}?ns={ns}")
            assert (status, error_code(body)) == (404, "NAME_UNKNOWN"), (ns, body)
    for host in (f"{LOOPBACK}:{evil.port}#.gcr.io", f"x@{LOOPBACK}:{evil.port}"):
        status, _, body = curl("-H", f"Host: {host}", f"{mirror.url}/v2/p/img/manifests/latest")
        assert (status, error_code(body)) == (404, "NAME_UNKNOWN"), (host, body)
    assert evil.connections == 0
    assert "Traceback" not in mirror.log_text()


# --- redirects ---------------------------------------------------------------------


def _same_path(request: BaseHTTPRequestHandler) -> str:
    return request.path


def test_upstream_redirects_are_bounded_and_stay_where_allowed(
    plain_registry, dockmirror, seeded, unique_repo, evil, tmp_path
):
    image = seeded(plain_registry, unique_repo, "v1")
    layer = image.platforms[0].layers[0]
    with Relay(plain_registry.url) as cdn:
        behaviours = {
            # Blobs come from a CDN on another origin, as Docker Hub's do.
            f"{unique_repo}/blobs/": redirect(
                lambda r: f"http://localhost:{cdn.port}{r.path}", status=307
            ),
            # 0.0.0.0 reaches this host's listeners, but is no loopback address.
            "evil/": redirect(lambda r: f"http://0.0.0.0:{evil.port}/x"),
            "evil-scheme/": redirect(lambda r: f"file:///etc/passwd#{evil.port}"),
            "loop/": redirect(_same_path),
        }
        with Relay(plain_registry.url, behaviours, basic="Basic dTpw") as relay:
            mirror = dockmirror(
                {
                    "corp": {
                        "plugin": "registry",
                        "url": relay.url,
                        "default": True,
                        "username": "u",
                        "password": "p",
                    }
                }
            )
            pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "out")
            assert_pulled(tmp_path / "out", image)
            # The credentials went to the configured host only.
            assert cdn.count(layer.digest) >= 1
            assert {r.authorization for r in cdn.received} == {None}
            assert "Basic dTpw" in {r.authorization for r in relay.received}

            for repo in ("evil", "evil-scheme"):
                status, _, body = curl(f"{mirror.url}/v2/{repo}/img/manifests/latest")
                assert (status, error_code(body)) == (502, "UNAVAILABLE"), body
            status, _, body = curl(f"{mirror.url}/v2/loop/img/manifests/latest")
            assert (status, error_code(body)) == (502, "UNAVAILABLE"), body
            assert "redirects" in json.loads(body)["errors"][0]["message"]
            # The request (with the credentials the pull made known), then five redirects.
            assert relay.count("/v2/loop/") == 6
    assert evil.connections == 0
    assert "Traceback" not in mirror.log_text()


# --- bodies that are too large or cut short ------------------------------------


def _fetch_manifest(relay: Relay, request: BaseHTTPRequestHandler) -> tuple[bytes, str]:
    accept = request.headers.get("Accept") or ""
    upstream = urllib.request.Request(relay.upstream + request.path, headers={"Accept": accept})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(upstream) as r:
        return r.read(), r.headers["Content-Type"]


def _answer(request: BaseHTTPRequestHandler, headers: dict[str, str]) -> None:
    request.close_connection = True
    request.send_response(200)
    for name, value in headers.items():
        request.send_header(name, value)
    request.end_headers()


def test_oversized_and_cut_bodies_are_upstream_errors_and_never_cached(
    plain_registry, dockmirror, seeded, unique_repo
):
    image = seeded(plain_registry, unique_repo, "v1")
    misbehave = {"declared": True, "chunked": True, "cut": True}

    def declared(request: BaseHTTPRequestHandler) -> bool:
        if not misbehave["declared"] or "/manifests/" not in request.path:
            return False
        _answer(
            request, {"Content-Length": str(MANIFEST_LIMIT + 1), "Content-Type": image.media_type}
        )
        return True

    def chunked(request: BaseHTTPRequestHandler) -> bool:
        if not misbehave["chunked"] or "/manifests/" not in request.path:
            return False
        _answer(request, {"Transfer-Encoding": "chunked", "Content-Type": image.media_type})
        chunk = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
        try:
            for _ in range((MANIFEST_LIMIT >> 16) + 2):
                request.wfile.write(chunk)
            request.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the mirror hung up: as it should
        return True

    def cut(request: BaseHTTPRequestHandler) -> bool:
        if not misbehave["cut"] or "/manifests/" not in request.path:
            return False
        body, content_type = _fetch_manifest(relay, request)
        # No Docker-Content-Digest: nothing but the length tells the body is whole.
        _answer(request, {"Content-Length": str(len(body)), "Content-Type": content_type})
        request.wfile.write(body[: len(body) // 2])
        return True

    behaviours = {
        f"{kind}/": behaviour
        for kind, behaviour in (("declared", declared), ("chunked", chunked), ("cut", cut))
    }
    for kind in misbehave:
        seeded(plain_registry, f"{kind}/{unique_repo}", "v1")
    with Relay(plain_registry.url, behaviours) as relay:
        mirror = dockmirror({"corp": {"plugin": "registry", "url": relay.url, "default": True}})
        for kind in misbehave:
            url = f"{mirror.url}/v2/{kind}/{unique_repo}/manifests/v1"
            accept = ("-H", f"Accept: {image.media_type}")
            status, _, body = curl(*accept, url)
            assert (status, error_code(body)) == (502, "UNAVAILABLE"), (kind, body)
            misbehave[kind] = False
            status, headers, body = curl(*accept, url)
            assert status == 200, (kind, body)
            assert headers["x-cache"] == "MISS"
            assert json.loads(body)["schemaVersion"] == 2
    wait_until(lambda: "upstream corp failed for cut/" in mirror.log_text())
    assert "Traceback" not in mirror.log_text()


def _deep(status: int, content_type: str, challenge: str | None = None):
    """A behaviour answering JSON nested deeper than Python's parser recurses."""
    body = b"[" * 100_000 + b"]" * 100_000

    def answer(request: BaseHTTPRequestHandler) -> bool:
        request.close_connection = True
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        if challenge is not None:
            request.send_header("WWW-Authenticate", challenge)
        request.end_headers()
        request.wfile.write(body)
        return True

    return answer


def test_json_nested_too_deeply_is_an_upstream_error(plain_registry, dockmirror):
    with Relay(plain_registry.url) as relay:
        token = f'Bearer realm="{relay.url}/v2/token-deep/token",service="relay"'
        relay.behaviours.update(
            {
                "manifest-deep/": _deep(200, "application/vnd.oci.image.manifest.v1+json"),
                "error-deep/": _deep(404, "application/json"),
                "tags-deep/": _deep(200, "application/json"),
                "token-deep/img/": _deep(401, "application/json", token),
                "token-deep/token": _deep(200, "application/json"),
            }
        )
        mirror = dockmirror({"corp": {"plugin": "registry", "url": relay.url, "default": True}})
        answers = {}
        for path in (
            "manifest-deep/img/manifests/v1",
            "error-deep/img/manifests/v1",
            "tags-deep/img/tags/list",
            "token-deep/img/manifests/v1",
        ):
            status, _, body = curl(f"{mirror.url}/v2/{path}")
            answers[path] = status, error_code(body)
    assert answers == {
        "manifest-deep/img/manifests/v1": (502, "UNAVAILABLE"),
        "error-deep/img/manifests/v1": (404, "MANIFEST_UNKNOWN"),
        "tags-deep/img/tags/list": (502, "UNAVAILABLE"),
        "token-deep/img/manifests/v1": (503, "UNAVAILABLE"),
    }
    assert "Traceback" not in mirror.log_text()


# --- upstreams with a private CA, and mutual TLS -----------------------------------


def _corp(url: str, **tls: Path) -> dict[str, dict[str, object]]:
    table: dict[str, object] = {"plugin": "registry", "url": url, "default": True}
    table.update({key: str(path) for key, path in tls.items()})
    return {"corp": table}


def _refused(mirror, repo: str) -> str:
    status, _, body = curl(f"{mirror.url}/v2/{repo}/manifests/v1")
    assert (status, error_code(body)) == (502, "UNAVAILABLE"), body
    message = json.loads(body)["errors"][0]["message"]
    assert "upstream corp" in message
    return str(message)


def test_an_upstream_with_a_private_ca(
    tls_registry, pki, dockmirror, seeded, unique_repo, tmp_path
):
    image = seeded(tls_registry, unique_repo, "v1")
    mirror = dockmirror(_corp(tls_registry.url, ca=pki.ca))
    pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "out")
    assert_pulled(tmp_path / "out", image)
    assert f"upstream corp: TLS trusts the system's CAs and {pki.ca}" in mirror.log_text()

    untrusting = dockmirror(_corp(tls_registry.url))
    assert "certificate verify failed" in _refused(untrusting, unique_repo)
    wait_until(lambda: "(trusting the system's CAs)" in untrusting.log_text())

    other = make_pki(tmp_path / "other-ca", "another CA")
    wrong = dockmirror(_corp(tls_registry.url, ca=other.ca))
    assert "certificate verify failed" in _refused(wrong, unique_repo)
    wait_until(lambda: f"(trusting the system's CAs and {other.ca})" in wrong.log_text())
    for m in (mirror, untrusting, wrong):
        assert "Traceback" not in m.log_text()


def test_an_upstream_that_requires_a_client_certificate(
    tls_registry, pki, dockmirror, seeded, unique_repo, tmp_path, tmp_path_factory
):
    image = seeded(tls_registry, unique_repo, "v1")
    with TLSRegistry(
        tmp_path_factory.mktemp("mtls-registry"),
        pki,
        client_cas=(pki.ca,),
        storage=tls_registry.storage_dir,
    ) as mtls:
        mirror = dockmirror(
            _corp(mtls.url, ca=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
        )
        pull(f"{mirror.host}/{unique_repo}:v1", tmp_path / "out")
        assert_pulled(tmp_path / "out", image)
        without = dockmirror(_corp(mtls.url, ca=pki.ca))
        assert "TLS" in _refused(without, unique_repo)
        assert "Traceback" not in mirror.log_text() + without.log_text()


def test_a_mirror_on_the_same_host_is_not_offered_the_client_certificate(
    tls_registry, pki, dockmirror, seeded, unique_repo, tmp_path, tmp_path_factory
):
    """The certificate is the credential of the configured origin: scheme, host and port."""
    image = seeded(tls_registry, unique_repo, "v1")
    certificate = {"ca": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key}
    with TLSRegistry(
        tmp_path_factory.mktemp("mtls-mirror"),
        pki,
        client_cas=(pki.ca,),
        storage=tls_registry.storage_dir,
    ) as other_port:
        assert other_port.host.split(":")[0] == tls_registry.host.split(":")[0]
        # Its own origin, it gets the certificate and serves.
        direct = dockmirror(_corp(other_port.url, **certificate))
        pull(f"{direct.host}/{unique_repo}:v1", tmp_path / "direct")
        assert_pulled(tmp_path / "direct", image)
        # As a mirror of an upstream on the same host, it does not: the pull fails.
        upstreams = _corp(tls_registry.url, **certificate)
        upstreams["corp"]["mirrors"] = [{"url": other_port.url, "trust_tags": True}]
        mirror = dockmirror(upstreams)
        tls_registry.stop()
        try:
            status, _, body = curl(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
            assert (status, error_code(body)) == (502, "UNAVAILABLE"), body
        finally:
            tls_registry.start()
        wait_until(lambda: "didn't provide a certificate" in other_port.log_text())
        assert "Traceback" not in direct.log_text() + mirror.log_text()


def test_unusable_tls_files_are_refused_at_check(pki, dockmirror, tmp_path):
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    url = f"https://{LOOPBACK}:1"
    cases = [
        (_corp(url, ca=not_pem), f"upstreams.corp.ca: {not_pem}: no PEM certificate found"),
        (_corp(url, ca=tmp_path / "missing.pem"), "upstreams.corp.ca: "),
        (
            _corp(url, client_cert=pki.client_cert, client_key=pki.server_key),
            f"upstreams.corp.client_key: {pki.server_key} is not the key of the certificate",
        ),
        (
            _corp(url, client_cert=pki.client_cert, client_key=not_pem),
            f"upstreams.corp.client_key: {not_pem}: not a PEM private key",
        ),
        (_corp(url, client_cert=pki.client_cert), "client_cert and client_key go together"),
    ]
    for upstreams, message in cases:
        mirror = dockmirror(upstreams, start=False)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "twisted",
                "dockmirror",
                "--config",
                str(mirror.config_path),
                "--check",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert message in result.stderr + result.stdout
        assert "Traceback" not in result.stderr
