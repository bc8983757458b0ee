"""What an attacker or an operator can do to the running server: metric labels,
login throttling, client addresses behind proxies, reload, TLS and config checks."""

from __future__ import annotations

import http.client
import random
import re
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from .conftest import Dockmirror, DockmirrorFactory
from .keys import create_key
from .registries import LOOPBACK, Registry, free_port, wait_until
from .test_auth import basic, hub_mirror
from .test_operations import run_check, served_serial, start_tls_mirror
from .test_pull import curl
from .upstream_servers import Nginx, nginx_binary


@pytest.fixture
def hub(plain_registry: Registry, dockmirror: DockmirrorFactory) -> Dockmirror:
    return dockmirror({"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}})


def _random_path(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "-._~%:@!$&'()*+,;="
    segments = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        for _ in range(rng.randint(1, 5))
    ]
    prefix = rng.choice(["", "v2/", "v2/x/", "docker-auth/", "metrics/"])
    return "/" + prefix + "/".join(segments) + rng.choice(["", "/", "?q=" + segments[0]])


def test_metric_labels_stay_bounded(hub: Dockmirror) -> None:
    rng = random.Random(9)
    methods = ["GET", "HEAD", "POST", "DELETE", "PROPFIND", "BREW", "M-SEARCH", "get"]
    connection = http.client.HTTPConnection(LOOPBACK, hub.port, timeout=10)
    for i in range(1000):
        method = rng.choice(methods) if i % 3 else "X" + "".join(rng.choices("ABCDEFGH", k=8))
        try:
            connection.request(method, _random_path(rng))
            connection.getresponse().read()
        except (http.client.HTTPException, OSError):
            connection.close()
            connection = http.client.HTTPConnection(LOOPBACK, hub.port, timeout=10)
    connection.close()
    status, _, body = curl(f"{hub.url}/metrics")
    assert status == 200
    series = re.findall(
        r'^dockmirror_http_requests_total\{method="([^"]*)",route="([^"]*)",status="([^"]*)"\}',
        body.decode(),
        re.MULTILINE,
    )
    routes = {route for _, route, _ in series}
    methods_seen = {method for method, _, _ in series}
    assert routes <= {"base", "manifest", "blob", "tags", "token", "metrics", "healthz", "other"}
    assert methods_seen <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods_seen and "other" in routes
    assert len(series) < 60, series


def _token_status(mirror: Dockmirror, app_id: str, api_key: str, *curl_args: str) -> int:
    url = f"{mirror.url}/docker-auth/token?service={mirror.host}"
    return curl(*curl_args, "-H", basic(app_id, api_key), url)[0]


@pytest.fixture
def keyed(plain_registry: Registry, dockmirror: DockmirrorFactory) -> Dockmirror:
    return hub_mirror(dockmirror, plain_registry)


def test_an_attacker_cannot_lock_a_key_out(keyed: Dockmirror) -> None:
    app_id, api_key = create_key(keyed, "victim")
    for _ in range(12):
        _token_status(keyed, app_id, "sk_guess")
    assert _token_status(keyed, app_id, "sk_guess") == 429
    assert _token_status(keyed, app_id, api_key) == 429  # the failing address waits
    # The victim, from another address, is not throttled.
    assert _token_status(keyed, app_id, api_key, "--interface", "127.0.0.2") == 200
    assert (
        curl("--interface", "127.0.0.2", "-H", basic(app_id, api_key), f"{keyed.url}/v2/")[0] == 200
    )


def test_client_address_from_a_trusted_proxy(
    plain_registry: Registry, dockmirror: DockmirrorFactory
) -> None:
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}},
        auth_required=True,
        extra={"server": {"trusted_proxies": ["127.0.0.1/32"]}},
    )
    app_id, api_key = create_key(mirror, "victim")
    attacker = ("-H", "X-Forwarded-For: 203.0.113.9")
    for _ in range(11):
        _token_status(mirror, app_id, "sk_guess", *attacker)
    assert _token_status(mirror, app_id, api_key, *attacker) == 429
    # Other clients behind the same proxy are not affected.
    assert _token_status(mirror, app_id, api_key, "-H", "X-Forwarded-For: 198.51.100.7") == 200
    assert _token_status(mirror, app_id, api_key) == 200  # the proxy itself
    # A client prepending addresses of its own is still known by the proxy's hop.
    spoofed = ("-H", "X-Forwarded-For: 198.51.100.7, 203.0.113.9")
    assert _token_status(mirror, app_id, api_key, *spoofed) == 429
    wait_until(lambda: "203.0.113.9 - GET /docker-auth/token" in mirror.log_text(), 5)
    # From a peer that is not a trusted proxy the header is not read.
    untrusted = ("--interface", "127.0.0.2")
    for i in range(11):
        _token_status(mirror, app_id, "sk_guess", *untrusted, "-H", f"X-Forwarded-For: 10.0.0.{i}")
    assert (
        _token_status(mirror, app_id, api_key, *untrusted, "-H", "X-Forwarded-For: 10.9.9.9") == 429
    )


def _rsa_certificate(directory: Path, serial: int) -> tuple[Path, Path]:
    directory.mkdir(exist_ok=True)
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-set_serial", str(serial)]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.fixture
def rsa_mirror(
    plain_registry: Registry, dockmirror: DockmirrorFactory, tmp_path: Path
) -> tuple[Dockmirror, int, Path, Path]:
    key, cert = _rsa_certificate(tmp_path / "tls", 1001)
    mirror, port = start_tls_mirror(dockmirror, plain_registry, key, cert)
    return mirror, port, key, cert


def _handshake(port: int, cipher: str) -> bool:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-tls1_2", "-cipher", cipher],
        input=b"",
        capture_output=True,
        timeout=20,
    )
    return result.returncode == 0 and b"Cipher is " + cipher.encode() in result.stdout


def test_tls12_offers_forward_secret_aead_ciphers_only(rsa_mirror) -> None:
    _, port, _, _ = rsa_mirror
    assert _handshake(port, "ECDHE-RSA-AES128-GCM-SHA256")
    assert _handshake(port, "ECDHE-RSA-CHACHA20-POLY1305")
    assert not _handshake(port, "AES128-SHA")
    assert not _handshake(port, "ECDHE-RSA-AES128-SHA")
    assert not _handshake(port, "AES256-GCM-SHA384")


def test_a_bad_key_at_reload_keeps_the_working_certificate(rsa_mirror, tmp_path: Path) -> None:
    mirror, port, key, cert = rsa_mirror
    assert served_serial(port, cert) == 1001
    other_key, _ = _rsa_certificate(tmp_path / "other", 2002)
    shutil.copy(other_key, key)  # a key that does not match the certificate
    time.sleep(6)  # past the interval of checks on the files
    assert served_serial(port, cert) == 1001
    mirror.send_signal(signal.SIGHUP)
    wait_until(lambda: mirror.log_text().count("keeping the current TLS certificate") >= 2, 5)
    assert served_serial(port, cert) == 1001
    assert f"{key}: the private key does not match the certificate" in mirror.log_text()
    key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    mirror.send_signal(signal.SIGHUP)
    wait_until(lambda: f"{key}: not a usable PEM private key" in mirror.log_text(), 5)
    assert served_serial(port, cert) == 1001
    assert "Traceback" not in mirror.log_text()


def test_sighup_without_tls_is_survived(hub: Dockmirror) -> None:
    hub.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: nothing to reload" in hub.log_text(), 5)
    assert hub.running
    assert curl(f"{hub.url}/v2/")[0] == 200


@pytest.mark.parametrize("broken", ["mismatched", "malformed"])
def test_check_names_a_bad_certificate_file(tmp_path: Path, broken: str) -> None:
    key, cert = _rsa_certificate(tmp_path / "tls", 1)
    if broken == "mismatched":
        other_key, _ = _rsa_certificate(tmp_path / "other", 2)
        shutil.copy(other_key, key)
    else:
        key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    config = tmp_path / "dockmirror.toml"
    listen = f"ssl:{free_port()}:interface={LOOPBACK}:privateKey={key}:certKey={cert}"
    config.write_text(
        f'[server]\nlisten = ["{listen}"]\n[upstreams.hub]\nplugin = "dockerhub"\ndefault = true\n'
    )
    result = run_check(config)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert f"server.listen: {listen!r}: {key}: " in output


def test_check_redacts_secrets_validates_the_manhole_and_warns(tmp_path: Path) -> None:
    config = tmp_path / "dockmirror.toml"
    upstream = (
        '[upstreams.corp]\nplugin = "registry"\nurl = "http://registry.corp.example"\n'
        'username = "mirror"\npassword = "hunter2-secret"\ndefault = true\n'
    )
    config.write_text(upstream)
    result = run_check(config)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "username='mirror', password='***'" in result.stdout
    assert "warning: " in result.stderr and "over plain HTTP" in result.stderr
    keys = tmp_path / "authorized_keys"
    keys.write_text("")
    config.write_text(f'[manhole]\nlisten = "tcp:notaport"\nauthorized_keys = "{keys}"\n{upstream}')
    result = run_check(config)
    assert result.returncode != 0
    assert "manhole.listen: 'tcp:notaport'" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_start_warns_of_credentials_over_plain_http(
    htpasswd_registry: Registry, dockmirror: DockmirrorFactory
) -> None:
    user, password = htpasswd_registry.creds
    mirror = dockmirror(
        {
            "corp": {
                "plugin": "registry",
                "url": htpasswd_registry.url,
                "username": user,
                "password": password,
                "default": True,
            }
        }
    )
    assert "upstreams.corp: credentials go to http://" in mirror.log_text()


def _password_grant(mirror: Dockmirror) -> tuple[str, str, str]:
    app_id, api_key = create_key(mirror, "ci")
    query = urlencode(
        {"grant_type": "password", "username": app_id, "password": api_key, "service": mirror.host}
    )
    return f"{mirror.url}/docker-auth/token", query, api_key


def test_token_post_reads_the_grant_from_the_body_only(keyed: Dockmirror) -> None:
    token_url, query, _ = _password_grant(keyed)
    # A POST reads the grant from its body only.
    status, _, body = curl("-X", "POST", f"{token_url}?{query}")
    assert status == 400 and b"only the password grant" in body
    status, _, _ = curl("-d", "grant_type=password&username=app_x", f"{token_url}?{query}")
    assert status == 401
    assert curl("-d", query, token_url)[0] == 200


def test_access_log_keeps_no_credentials_from_queries(keyed: Dockmirror) -> None:
    token_url, query, api_key = _password_grant(keyed)
    leaky = urlencode({"refresh_token": "rt-secret", "client_secret": "cs-secret", "x": "1"})
    curl(f"{token_url}?{query}&{leaky}")
    curl(f"{keyed.url}/v2/?Password={api_key}")
    wait_until(lambda: "/v2/?Password=***" in keyed.log_text(), 5)
    log = keyed.log_text()
    for secret in (api_key, "rt-secret", "cs-secret"):
        assert secret not in log
    assert "password=***" in log and "refresh_token=***&client_secret=***&x=1" in log


#: The most ``systemd-analyze security`` may rate the shipped unit's exposure.
MAX_EXPOSURE = 2.0


def test_systemd_unit_exposure() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = Path(__file__).resolve().parents[2] / "systemd" / "dockmirror.service"
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Overall exposure level for dockmirror.service: ([0-9.]+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


#: nginx's server: a reverse proxy to the mirror that appends the client's address.
NGINX_SERVER = """\
        location / {{
            proxy_pass http://{loopback}:{upstream};
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}"""


@pytest.fixture
def behind_nginx(
    plain_registry: Registry, dockmirror: DockmirrorFactory, tmp_path: Path
) -> Iterator[tuple[Dockmirror, str]]:
    """A mirror that trusts the nginx in front of it; nginx's URL."""
    if nginx_binary() is None:
        pytest.skip("nginx is not installed")
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}},
        auth_required=True,
        extra={"server": {"trusted_proxies": [f"{LOOPBACK}/32"]}},
    )
    server = NGINX_SERVER.format(loopback=LOOPBACK, upstream=mirror.port)
    with Nginx(tmp_path, server) as nginx:
        yield mirror, f"http://{LOOPBACK}:{nginx.port}"


def test_clients_behind_a_real_reverse_proxy(behind_nginx: tuple[Dockmirror, str]) -> None:
    mirror, url = behind_nginx
    app_id, api_key = create_key(mirror, "victim")
    token = f"{url}/docker-auth/token"
    attacker = ("--interface", "127.0.0.2", "-H", "X-Forwarded-For: 127.0.0.3")
    for _ in range(11):
        curl(*attacker, "-H", basic(app_id, "sk_guess"), token)
    assert curl(*attacker, "-H", basic(app_id, api_key), token)[0] == 429
    # The address the attacker wrote into the header is a victim's; nginx
    # appends the attacker's own, which is the one that counts.
    assert curl("--interface", "127.0.0.3", "-H", basic(app_id, api_key), token)[0] == 200
    wait_until(lambda: "127.0.0.2 - GET /docker-auth/token 429" in mirror.log_text(), 5)
    assert f"127.0.0.3 {app_id} GET /docker-auth/token 200" in mirror.log_text()
