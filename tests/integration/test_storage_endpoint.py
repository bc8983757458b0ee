"""The S3 endpoint as operators run it: TLS with a private CA, a proxy, buckets as virtual hosts.

The endpoint is a second radosgw on the session's Ceph store, serving TLS
with a certificate of a test CA and knowing its DNS name, so that a bucket
is reached as ``<bucket>.s3.dockmirror.test`` too.  That name resolves only
inside the private mount namespace of the node that uses it, whose
``/etc/hosts`` is a file of the test's own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .ceph import CephS3, Gateway, S3Bucket
from .conftest import Dockmirror, DockmirrorFactory
from .images import pull
from .registries import LOOPBACK, Registry, wait_until
from .test_operations import run_check
from .test_pull import assert_pulled, curl
from .test_storage import BIG, objects, sha256, stored, uploads
from .upstream_servers import PKI, Nginx, Tinyproxy, make_pki, nginx_binary

DNS_NAME = "s3.dockmirror.test"


@pytest.fixture(scope="module")
def storage_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    names = f"IP:{LOOPBACK},DNS:{DNS_NAME},DNS:*.{DNS_NAME}"
    return make_pki(tmp_path_factory.mktemp("storage-pki"), "storage test CA", names)


@pytest.fixture(scope="module")
def gateway(
    ceph_s3: CephS3, storage_pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    process = ceph_s3.gateway(
        tmp_path_factory.mktemp("gateway"),
        DNS_NAME,
        storage_pki.server_cert,
        storage_pki.server_key,
    )
    yield process
    process.stop()


def node(
    dockmirror: DockmirrorFactory,
    registry: Registry,
    s3: S3Bucket,
    *,
    start: bool = True,
    env: dict[str, str] | None = None,
    **storage: object,
) -> Dockmirror:
    return dockmirror(
        {"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}},
        extra={"storage": s3.storage_table(**storage)},
        start=start,
        env=env,
    )


def assert_stored(s3: S3Bucket, registry: Registry, image) -> None:
    """Every blob of *image*, and its manifest, is in the bucket at its key."""
    blobs = [*image.platforms[0].layers, image.platforms[0].config]
    wait_until(lambda: len(objects(s3)) == len(blobs) + 1, timeout=30)
    for blob in blobs:
        assert stored(s3, blob.digest) == registry.storage_path_of_blob(blob.digest).read_bytes()
    assert stored(s3, image.digest) == image.manifest
    assert uploads(s3) == []


def assert_served_from_the_bucket(mirror: Dockmirror, repository: str, blob) -> None:
    status, headers, body = curl(f"{mirror.url}/v2/{repository}/blobs/{blob.digest}")
    assert (status, sha256(body)) == (200, blob.digest)
    assert (headers["x-cache"], headers["x-cache-tier"]) == ("HIT", "shared")


def test_an_endpoint_with_a_private_ca_is_refused_without_its_ca_and_used_with_it(
    registry_factory, dockmirror, seeded, unique_repo, s3, gateway, storage_pki, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[BIG, 100_000])
    endpoint = f"https://{LOOPBACK}:{gateway.tls_port}"

    refused = node(dockmirror, registry, s3, endpoint=endpoint)
    wait_until(lambda: "cannot be used now" in refused.log_text(), timeout=10)
    log = refused.log_text()
    assert "TLS handshake failed" in log and "certificate verify failed" in log, log
    assert "(trusting the system's CAs; see storage.ca" in log
    pull(f"{refused.host}/{unique_repo}:v1", tmp_path / "refused")  # from the upstream
    assert_pulled(tmp_path / "refused", image)
    assert objects(s3) == {}
    assert "Traceback" not in refused.log_text()

    trusting = node(dockmirror, registry, s3, endpoint=endpoint, ca=str(storage_pki.ca))
    pull(f"{trusting.host}/{unique_repo}:v1", tmp_path / "trusting")
    assert_pulled(tmp_path / "trusting", image)
    assert_stored(s3, registry, image)
    assert f"upstream storage: TLS trusts the system's CAs and {storage_pki.ca}" in (
        trusting.log_text()
    )
    second = node(dockmirror, registry, s3, endpoint=endpoint, ca=str(storage_pki.ca))
    assert_served_from_the_bucket(second, unique_repo, image.platforms[0].layers[0])
    for mirror in (trusting, second):
        assert "Traceback" not in mirror.log_text()


#: nginx's server: TLS in front of the gateway, requiring a client certificate of the CA.
NGINX_MUTUAL_TLS = """\
        ssl_certificate {pki.server_cert};
        ssl_certificate_key {pki.server_key};
        ssl_client_certificate {pki.ca};
        ssl_verify_client on;
        client_max_body_size 0;
        location / {{
            proxy_pass http://{loopback}:{gateway};
            proxy_set_header Host $http_host;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }}"""


def test_an_endpoint_that_requires_a_client_certificate_gets_it(
    registry_factory, dockmirror, seeded, unique_repo, s3, gateway, storage_pki, tmp_path
):
    if nginx_binary() is None:
        pytest.skip("nginx is not installed")
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[BIG])
    server = NGINX_MUTUAL_TLS.format(loopback=LOOPBACK, gateway=gateway.port, pki=storage_pki)
    (tmp_path / "nginx").mkdir()
    with Nginx(tmp_path / "nginx", server, ssl=True) as nginx:
        keys = {"endpoint": f"https://{LOOPBACK}:{nginx.port}", "ca": str(storage_pki.ca)}
        without = node(dockmirror, registry, s3, **keys)
        wait_until(lambda: "cannot be used now" in without.log_text(), timeout=10)
        assert "Traceback" not in without.log_text()
        with_cert = node(
            dockmirror,
            registry,
            s3,
            client_cert=str(storage_pki.client_cert),
            client_key=str(storage_pki.client_key),
            **keys,
        )
        pull(f"{with_cert.host}/{unique_repo}:v1", tmp_path / "out")
        assert_pulled(tmp_path / "out", image)
        assert_stored(s3, registry, image)
        assert "cannot be used now" not in with_cert.log_text()
        assert "Traceback" not in with_cert.log_text()


@pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="needs tinyproxy")
def test_the_endpoint_is_reached_through_the_proxy_of_the_config_or_the_environment(
    registry_factory, dockmirror, seeded, unique_repo, s3, gateway, storage_pki, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[BIG])
    [layer] = image.platforms[0].layers
    target = f"{LOOPBACK}:{gateway.tls_port}"
    keys = {"endpoint": f"https://{target}", "ca": str(storage_pki.ca)}
    (tmp_path / "proxy").mkdir()
    with Tinyproxy(tmp_path / "proxy", (gateway.tls_port,)) as proxy:
        first = node(dockmirror, registry, s3, proxy=proxy.url, **keys)
        pull(f"{first.host}/{unique_repo}:v1", tmp_path / "first")
        assert_pulled(tmp_path / "first", image)
        assert_stored(s3, registry, image)
        tunnels = proxy.connects(target)
        assert tunnels >= 1
        assert f"upstream storage: connections go through {proxy.url} (config)" in (
            first.log_text()
        )

        # HTTPS_PROXY applies as it does to the upstreams; the upstream is NO_PROXY's.
        env = {"HTTPS_PROXY": proxy.url, "NO_PROXY": "example.com"}
        second = node(dockmirror, registry, s3, env=env, **keys)
        assert_served_from_the_bucket(second, unique_repo, layer)
        assert proxy.connects(target) > tunnels
        tunnels = proxy.connects(target)

        # proxy = "none": straight to the endpoint, whatever the environment says.
        direct = node(dockmirror, registry, s3, env=env, proxy="none", **keys)
        assert_served_from_the_bucket(direct, unique_repo, layer)
        assert proxy.connects(target) == tunnels
    for mirror in (first, second, direct):
        assert "Traceback" not in mirror.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="a private /etc/hosts needs root")
def test_buckets_addressed_as_virtual_hosts(
    registry_factory, dockmirror, seeded, unique_repo, s3, gateway, storage_pki, tmp_path
):
    registry = registry_factory()
    image = seeded(registry, unique_repo, "v1", layers=[BIG, 100_000])
    # Only the bucket's own host name resolves: a request in path style would fail.
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n::1 localhost\n127.0.0.1 {s3.bucket}.{DNS_NAME}\n")

    def virtual() -> Dockmirror:
        mirror = node(
            dockmirror,
            registry,
            s3,
            start=False,
            endpoint=f"https://{DNS_NAME}:{gateway.tls_port}",
            addressing="virtual",
            ca=str(storage_pki.ca),
        )
        mirror.run_under(
            *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
            f'mount --bind {hosts} /etc/hosts && exec "$@"',
            "sh",
        )
        mirror.start()
        return mirror

    first = virtual()
    pull(f"{first.host}/{unique_repo}:v1", tmp_path / "first")
    assert_pulled(tmp_path / "first", image)
    assert_stored(s3, registry, image)  # at the keys of the digests, not under the bucket's name
    second = virtual()
    assert_served_from_the_bucket(second, unique_repo, image.platforms[0].layers[0])
    for mirror in (first, second):
        assert "Traceback" not in mirror.log_text()
        assert "cannot be used now" not in mirror.log_text()
    assert not Path("/etc/hosts").read_text().count(DNS_NAME)


def test_check_reads_the_endpoints_ca_and_client_certificate(tmp_path, storage_pki):
    config = tmp_path / "dockmirror.toml"
    table = '[storage]\nbackend = "s3"\nendpoint = "https://rgw.corp.example"\nbucket = "mirror"\n'
    config.write_text(table + f'ca = "{tmp_path}/absent.pem"\n')
    result = run_check(config)
    assert result.returncode != 0
    assert f"{config}: storage.ca: {tmp_path}/absent.pem: cannot read" in result.stdout
    keys = (
        f'ca = "{storage_pki.ca}"\nclient_cert = "{storage_pki.client_cert}"\n'
        f'client_key = "{storage_pki.server_key}"\n'
    )
    config.write_text(table + keys)
    result = run_check(config)
    assert result.returncode != 0
    assert "storage.client_key" in result.stdout and "is not the key of" in result.stdout
    config.write_text(table + keys.replace("server.key", "client.key"))
    result = run_check(config)
    assert result.returncode == 0, result.stderr
