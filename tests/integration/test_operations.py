"""Running dockmirror: TLS, metrics, health, config checks, the systemd unit."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .registries import LOOPBACK, free_port, wait_until
from .test_pull import curl

REPO = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).with_name("twistd"))


def write_certificate(directory: Path, serial: int) -> tuple[Path, Path]:
    """A self-signed certificate for localhost; returns (key, cert) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def served_serial(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(
        socket.create_connection((LOOPBACK, port), timeout=5),
        server_hostname="localhost",
    ) as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def start_tls_mirror(dockmirror, registry, key: Path, cert: Path):
    """A mirror with a TLS listener on *key* and *cert*, and a plain one; the TLS port."""
    port, plain = free_port(), free_port()
    listen = f"ssl:{port}:interface={LOOPBACK}:privateKey={key}:certKey={cert}"
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}},
        extra={"server": {"listen": [listen, f"tcp:{plain}:interface={LOOPBACK}"]}},
        start=False,
    )
    # Wait for the plain listener; the TLS one comes up with it.
    mirror.port = plain
    mirror.start()
    return mirror, port


@pytest.fixture
def tls_mirror(plain_registry, dockmirror, tmp_path):
    key, cert = write_certificate(tmp_path, serial=1001)
    mirror, port = start_tls_mirror(dockmirror, plain_registry, key, cert)
    return mirror, port, key, cert, tmp_path


def old_tls_client(maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """A client context that really offers TLS 1.0 up to ``maximum`` (OpenSSL 3 would not)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = maximum
    return context


def handshake(port: int, context: ssl.SSLContext) -> str:
    """The TLS version a handshake with 127.0.0.1:``port`` settles on."""
    with context.wrap_socket(
        socket.create_connection((LOOPBACK, port), timeout=5), server_hostname="localhost"
    ) as tls:
        return str(tls.version())


def test_old_tls_client_offers_tls_1_1(tmp_path):
    """The client below is able to speak TLS 1.1: a server that allows it gets TLS 1.1."""
    key, cert = write_certificate(tmp_path, serial=1)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_context.minimum_version = ssl.TLSVersion.TLSv1
        old = old_tls_client(ssl.TLSVersion.TLSv1_1)
    server_context.load_cert_chain(cert, key)
    with socket.create_server((LOOPBACK, 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=accept)
        thread.start()
        try:
            assert handshake(port, old) == "TLSv1.1"
        finally:
            thread.join(timeout=5)


def test_tls_serves_verified_and_refuses_old_versions(tls_mirror):
    mirror, port, _, cert, _ = tls_mirror
    status, headers, _ = curl("--cacert", str(cert), f"https://localhost:{port}/v2/")
    assert status == 200
    assert headers["docker-distribution-api-version"] == "registry/2.0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tls_1_1 = old_tls_client(ssl.TLSVersion.TLSv1_1)
        tls_1_2 = old_tls_client(ssl.TLSVersion.TLSv1_2)
    # The server answers a TLS 1.0/1.1-only hello with a protocol_version alert ...
    with pytest.raises(ssl.SSLError) as refused:
        handshake(port, tls_1_1)
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
    # ... while the same client, allowed TLS 1.2, gets through.
    assert handshake(port, tls_1_2) == "TLSv1.2"


def overwrite_unnoticed(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` keeping its inode, size and mtime."""
    before = path.stat()
    assert len(data) == before.st_size
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def test_certificate_reloads_on_change_and_sighup(tls_mirror):
    mirror, port, key, cert, directory = tls_mirror
    assert served_serial(port, cert) == 1001
    renewed = directory / "renewed"
    renewed.mkdir()
    new_key, new_cert = write_certificate(renewed, serial=2002)
    shutil.copy(new_key, key)
    shutil.copy(new_cert, cert)
    wait_until(lambda: served_serial(port, cert) == 2002, timeout=15)
    # A broken renewal keeps the working certificate.
    cert.write_text("garbage")
    # (The files are checked when connections arrive.)
    wait_until(
        lambda: (
            served_serial(port, new_cert) == 2002
            and "keeping the current TLS certificate" in mirror.log_text()
        ),
        timeout=15,
    )
    shutil.copy(new_cert, cert)
    wait_until(lambda: served_serial(port, cert) == 2002, timeout=15)
    # SIGHUP reloads files that the periodic check cannot see changed: same
    # inode, size and mtime.
    third = directory / "third"
    third.mkdir()
    for _ in range(100):
        k3, c3 = write_certificate(third, serial=3003)
        if c3.stat().st_size == cert.stat().st_size:
            break
    overwrite_unnoticed(key, k3.read_bytes())
    overwrite_unnoticed(cert, c3.read_bytes())
    mirror.send_signal(signal.SIGHUP)
    wait_until(lambda: served_serial(port, cert) == 3003, timeout=5)
    assert "SIGHUP: reloading TLS certificates" in mirror.log_text()


def test_metrics_health_and_access_log(plain_registry, dockmirror, seeded, unique_repo):
    image = seeded(plain_registry, unique_repo, "v1")
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}}
    )
    accept = ("-H", f"Accept: {image.media_type}")
    status, _, body = curl(*accept, f"{mirror.url}/v2/{unique_repo}/manifests/v1")
    assert (status, body) == (200, image.manifest)
    assert curl(f"{mirror.url}/v2/{unique_repo}/manifests/nope")[0] == 404
    status, headers, body = curl(f"{mirror.url}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert 'dockmirror_http_requests_total{method="GET",route="manifest",status="200"} 1.0' in text
    assert 'dockmirror_http_requests_total{method="GET",route="manifest",status="404"} 1.0' in text
    assert 'dockmirror_upstream_response_seconds_count{upstream="hub"}' in text
    status, _, body = curl(f"{mirror.url}/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["checks"] == {
        "cache_directory": {"ok": True},
        "cache_space": {"ok": True},
        "key_store": {"ok": True},
    }
    wait_until(lambda: f"GET /v2/{unique_repo}/manifests/v1 200" in mirror.log_text(), 5)
    line = next(
        line
        for line in mirror.log_text().splitlines()
        if f"/v2/{unique_repo}/manifests/v1 200" in line
    )
    assert "upstream=hub" in line


def test_metrics_allow_list(plain_registry, dockmirror):
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}},
        extra={"metrics": {"allow": ["10.0.0.0/8"]}},
    )
    status, _, body = curl(f"{mirror.url}/metrics")
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"


def test_metrics_on_their_own_listener(plain_registry, dockmirror):
    port = free_port()
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}},
        extra={"metrics": {"listen": [f"tcp:{port}:interface={LOOPBACK}"]}},
    )
    assert curl(f"http://{LOOPBACK}:{port}/metrics")[0] == 200
    assert curl(f"http://{LOOPBACK}:{port}/healthz")[0] == 200
    assert curl(f"{mirror.url}/metrics")[0] == 404


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "dockmirror", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=config.parent,
    )


def test_check_flag(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[upstreams.hub]\nplugin = "dockerhub"\ndefault = true\n')
    result = run_check(good)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[cache]\ndirectroy = "/x"\n')
    result = run_check(bad)
    assert result.returncode != 0
    assert f"{bad}: unknown key cache.directroy" in result.stderr + result.stdout
    shipped = run_check(REPO / "etc" / "dockmirror.toml")
    # The shipped file names certificate paths that do not exist here.
    assert "server.listen" in shipped.stderr + shipped.stdout


def test_systemd_unit():
    unit = (REPO / "systemd" / "dockmirror.service").read_text()
    for line in [
        "User=dockmirror",
        "StateDirectory=dockmirror",
        "CacheDirectory=dockmirror",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "StandardOutput=journal",
        "ExecStart=/opt/dockmirror/bin/twistd --nodaemon --pidfile= dockmirror"
        " --config /etc/dockmirror/dockmirror.toml",
    ]:
        assert line in unit.splitlines()


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "systemd" / "dockmirror.service").read_text()
    local = tmp_path / "dockmirror.service"
    local.write_text(unit.replace("/opt/dockmirror/bin/twistd", TWISTD))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "dockmirror.service" not in result.stderr, result.stderr


def test_plain_listener_answers_a_tls_handshake_at_once(plain_registry, dockmirror):
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}}
    )
    started = time.monotonic()
    result = subprocess.run(
        ["curl", "-s", "-k", "--max-time", "20", f"https://{mirror.host}/v2/"],
        capture_output=True,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 10
    assert curl(f"{mirror.url}/v2/")[0] == 200


def test_check_refuses_a_public_url_with_a_path(tmp_path):
    """Registry clients reach a registry at the root of its host: no path prefix."""
    config = tmp_path / "prefix.toml"
    config.write_text(
        '[server]\npublic_url = "https://example.com/mirror/"\n'
        '[upstreams.hub]\nplugin = "dockerhub"\ndefault = true\n'
    )
    result = run_check(config)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert "server.public_url must be the root of a host" in output, output
    assert "/mirror/" in output
