"""TLS listeners speak HTTP/1.1 only, even to a client asking for HTTP/2.

h2 was measured slower and far hungrier for memory than HTTP/1.1 through
Twisted (bench/RESULTS.md, "HTTP/2 over TLS"), so ALPN offers nothing.
"""

from __future__ import annotations

import hashlib
import subprocess

from .clients import make_server_tls, tls_endpoint
from .registries import LOOPBACK, free_port


def test_a_client_asking_for_h2_gets_http11_and_the_exact_blob(
    plain_registry, dockmirror, seeded, unique_repo, tmp_path
):
    image = seeded(plain_registry, unique_repo, "v1", layers=[300_000])
    layer = image.platforms[0].layers[0]
    tls = make_server_tls(tmp_path, "localhost")
    plain_port, tls_port = free_port(), free_port()
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}},
        extra={
            "server": {
                "listen": [
                    f"tcp:{plain_port}:interface={LOOPBACK}",
                    tls_endpoint(tls_port, LOOPBACK, tls),
                ]
            }
        },
        start=False,
    )
    mirror.port = plain_port  # waited on; the TLS listener comes up with it
    mirror.start()
    url = f"https://localhost:{tls_port}/v2/{unique_repo}/blobs/{layer.digest}"
    for flag in ("--http2", "--http1.1"):
        body = tmp_path / "blob"
        version = subprocess.run(
            ["curl", "-sSf", "--noproxy", "*", "--cacert", str(tls.ca), flag]
            + ["-o", str(body), "-w", "%{http_version}", url],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
        assert version == b"1.1", flag
        assert "sha256:" + hashlib.sha256(body.read_bytes()).hexdigest() == layer.digest
