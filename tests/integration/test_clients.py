"""docker, podman and containerd pulling through the real dockmirror process.

The configurations used here are the ones docs/clients.rst shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .client_fixtures import ClientUpstreams, TLSMirror, requires_clients
from .clients import Containerd, Docker, Podman

needs_docker = requires_clients("dockerd", "docker")
needs_podman = requires_clients("podman")
needs_containerd = requires_clients("containerd", "ctr")


# --- docker ----------------------------------------------------------------------


@needs_docker
def test_docker_registry_mirror_serves_a_docker_hub_pull(
    docker: Docker, open_mirror: TLSMirror, client_upstreams: ClientUpstreams
) -> None:
    """With ``registry-mirrors`` in daemon.json, ``docker pull alpine:3`` goes to the mirror."""
    mark = open_mirror.log_mark()
    docker.pull("alpine:3").check()
    assert docker.repo_digests("alpine:3") == [f"alpine@{client_upstreams.alpine.digest}"]
    open_mirror.wait_for_request(r"^GET /v2/library/alpine/blobs/sha256:", since=mark)


@needs_docker
@pytest.mark.parametrize("path", ["library/alpine", "alpine"])
def test_docker_pulls_docker_hub_by_domain_prefix(
    docker: Docker, open_mirror: TLSMirror, client_upstreams: ClientUpstreams, path: str
) -> None:
    """``docker pull mirror:PORT/library/alpine:3`` and ``.../alpine:3`` get Docker Hub's image."""
    reference = f"{open_mirror.host}/{path}:3"
    docker.pull(reference).check()
    digest = client_upstreams.alpine.digest
    assert docker.repo_digests(reference) == [f"{open_mirror.host}/{path}@{digest}"]


@needs_docker
def test_docker_pulls_another_upstream_by_domain_prefix(
    docker: Docker, open_mirror: TLSMirror, client_upstreams: ClientUpstreams
) -> None:
    reference = f"{open_mirror.host}/ghcr.io/owner/img:tag"
    docker.pull(reference).check()
    digest = client_upstreams.img.digest
    assert docker.repo_digests(reference) == [f"{open_mirror.host}/ghcr.io/owner/img@{digest}"]


@needs_docker
def test_docker_verifies_the_mirror_certificate(docker: Docker, open_mirror: TLSMirror) -> None:
    """Without the CA in certs.d the pull fails on the certificate: TLS is really checked."""
    ca = docker.etc / "certs.d" / open_mirror.host / "ca.crt"
    saved = ca.read_bytes()
    ca.unlink()
    try:
        result = docker.pull(f"{open_mirror.host}/library/alpine:3")
    finally:
        ca.write_bytes(saved)
    assert result.returncode != 0
    assert "x509: certificate signed by unknown authority" in result.output


# --- podman ----------------------------------------------------------------------


@needs_podman
def test_podman_pulls_by_domain_prefix(
    podman: Podman, open_mirror: TLSMirror, client_upstreams: ClientUpstreams
) -> None:
    reference = f"{open_mirror.host}/library/alpine:3"
    podman.pull(reference).check()
    assert podman.digest(reference) == client_upstreams.alpine.digest


@needs_podman
def test_podman_registries_conf_sends_docker_hub_and_ghcr_to_the_mirror(
    podman: Podman, open_mirror: TLSMirror, client_upstreams: ClientUpstreams
) -> None:
    """registries.conf ``location`` rewrites need no fallback to the real registries."""
    mark = open_mirror.log_mark()
    podman.pull("docker.io/library/alpine:3").check()
    podman.pull("ghcr.io/owner/img:tag").check()
    assert podman.digest("docker.io/library/alpine:3") == client_upstreams.alpine.digest
    assert podman.digest("ghcr.io/owner/img:tag") == client_upstreams.img.digest
    open_mirror.wait_for_request(r"^GET /v2/library/alpine/manifests/3$", since=mark)
    open_mirror.wait_for_request(r"^GET /v2/ghcr\.io/owner/img/manifests/tag$", since=mark)


# --- containerd ------------------------------------------------------------------


@needs_containerd
def test_containerd_hosts_toml_mirrors_docker_io_with_ns(
    containerd: Containerd,
    open_mirror: TLSMirror,
    open_mirror_hosts_dir: Path,
    client_upstreams: ClientUpstreams,
) -> None:
    """containerd adds ``?ns=docker.io`` to every request; dockmirror routes by it."""
    mark = open_mirror.log_mark()
    containerd.pull("docker.io/library/alpine:3", open_mirror_hosts_dir).check()
    assert containerd.digest("docker.io/library/alpine:3") == client_upstreams.alpine.digest
    requests = open_mirror.wait_for_request(
        r"^GET /v2/library/alpine/blobs/sha256:\w+\?ns=docker\.io$", since=mark
    )
    assert all(r.endswith("?ns=docker.io") for r in requests), requests


@needs_containerd
def test_containerd_hosts_toml_mirrors_ghcr_io(
    containerd: Containerd,
    open_mirror: TLSMirror,
    open_mirror_hosts_dir: Path,
    client_upstreams: ClientUpstreams,
) -> None:
    mark = open_mirror.log_mark()
    containerd.pull("ghcr.io/owner/img:tag", open_mirror_hosts_dir).check()
    assert containerd.digest("ghcr.io/owner/img:tag") == client_upstreams.img.digest
    open_mirror.wait_for_request(r"^GET /v2/owner/img/manifests/sha256:\w+\?ns=ghcr\.io$", mark)
