"""docker, podman and containerd pulling through the real dockmirror process.

The configurations used here are the ones README.rst's client guide shows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .client_fixtures import ClientUpstreams, TLSMirror, requires_clients
from .clients import Containerd, Docker, Podman
from .keys import create_key

needs_docker = requires_clients("dockerd", "docker")
needs_podman = requires_clients("podman")
needs_containerd = requires_clients("containerd", "ctr")


# --- docker ----------------------------------------------------------------------


@needs_docker
@pytest.mark.parametrize("mirror", ["open", "locked"])
def test_docker_registry_mirror_serves_a_docker_hub_pull(
    request: pytest.FixtureRequest, mirror: str, client_upstreams: ClientUpstreams
) -> None:
    """With ``registry-mirrors`` in daemon.json, ``docker pull alpine:3`` goes to the mirror.

    docker sends the mirror no credentials: on the locked mirror this works
    because ``[auth] anonymous_repos`` opens Docker Hub's library/.
    """
    docker: Docker = request.getfixturevalue(f"{mirror}_docker")
    tls_mirror: TLSMirror = request.getfixturevalue(f"{mirror}_mirror")
    mark = tls_mirror.log_mark()
    docker.pull("alpine:3").check()
    assert docker.repo_digests("alpine:3") == [f"alpine@{client_upstreams.alpine.digest}"]
    tls_mirror.wait_for_request(r"^GET /v2/library/alpine/blobs/sha256:", since=mark)


@needs_docker
@pytest.mark.parametrize(
    ("name", "tag", "image"),
    [
        ("library/alpine", "3", "alpine"),
        ("alpine", "3", "alpine"),
        ("ghcr.io/owner/img", "tag", "img"),
    ],
)
def test_docker_pulls_by_domain_prefix(
    open_docker: Docker,
    open_mirror: TLSMirror,
    client_upstreams: ClientUpstreams,
    name: str,
    tag: str,
    image: str,
) -> None:
    """``docker pull mirror:PORT/NAME:TAG`` gets the upstream's image, digest and all.

    ``library/alpine`` and ``alpine`` are Docker Hub's (the default upstream),
    ``ghcr.io/...`` ghcr.io's.
    """
    reference = f"{open_mirror.host}/{name}:{tag}"
    open_docker.pull(reference).check()
    digest = getattr(client_upstreams, image).digest
    assert open_docker.repo_digests(reference) == [f"{open_mirror.host}/{name}@{digest}"]


@needs_docker
def test_docker_verifies_the_mirror_certificate(
    open_docker: Docker, open_mirror: TLSMirror
) -> None:
    """Without the CA in certs.d the pull fails on the certificate: TLS is really checked."""
    ca = open_docker.etc / "certs.d" / open_mirror.host / "ca.crt"
    saved = ca.read_bytes()
    ca.unlink()
    try:
        result = open_docker.pull(f"{open_mirror.host}/library/alpine:3")
    finally:
        ca.write_bytes(saved)
    assert result.returncode != 0
    assert "x509: certificate signed by unknown authority" in result.output


# --- docker with API keys ---------------------------------------------------------


@needs_docker
def test_docker_login_with_an_api_key(locked_docker: Docker, locked_mirror: TLSMirror) -> None:
    app_id, api_key = create_key(locked_mirror.server, "docker-login")
    result = locked_docker.login(locked_mirror.host, app_id, api_key)
    assert result.returncode == 0, result.output
    assert "Login Succeeded" in result.stdout


@needs_docker
def test_docker_login_with_a_wrong_key_fails(
    locked_docker: Docker, locked_mirror: TLSMirror, locked_mirror_key: tuple[str, str]
) -> None:
    app_id, _ = locked_mirror_key
    result = locked_docker.login(locked_mirror.host, app_id, "dm_wrong")
    assert result.returncode != 0
    assert "Login Succeeded" not in result.output
    assert "unauthorized" in result.output, result.output


@needs_docker
def test_docker_pulls_a_protected_repository_after_login(
    locked_docker: Docker,
    locked_mirror: TLSMirror,
    locked_mirror_key: tuple[str, str],
    client_upstreams: ClientUpstreams,
) -> None:
    locked_docker.login(locked_mirror.host, *locked_mirror_key).check()
    mark = locked_mirror.log_mark()
    reference = f"{locked_mirror.host}/ghcr.io/owner/img:tag"
    locked_docker.pull(reference).check()
    digest = client_upstreams.img.digest
    assert locked_docker.repo_digests(reference) == [
        f"{locked_mirror.host}/ghcr.io/owner/img@{digest}"
    ]
    requests = locked_mirror.wait_for_request(r"^GET /v2/ghcr\.io/owner/img/blobs/", since=mark)
    app_id, _ = locked_mirror_key
    assert {r.key for r in requests if "/owner/img/" in r.uri} == {app_id}


@needs_docker
def test_docker_pull_of_a_protected_repository_needs_login(
    locked_docker: Docker, locked_mirror: TLSMirror
) -> None:
    result = locked_docker.pull(f"{locked_mirror.host}/ghcr.io/owner/img:tag")
    assert result.returncode != 0
    assert "authentication required" in result.output, result.output


@needs_docker
def test_docker_registry_mirror_gets_no_mirror_credentials(
    locked_docker: Docker, locked_mirror: TLSMirror, locked_mirror_key: tuple[str, str]
) -> None:
    """Logged in to the mirror, docker still asks it anonymously for a mirrored pull.

    The mirror answers 401, docker falls back to Docker Hub itself, which
    here is a refused connection on loopback.
    """
    locked_docker.login(locked_mirror.host, *locked_mirror_key).check()
    mark = locked_mirror.log_mark()
    result = locked_docker.pull("team/app:1")
    assert result.returncode != 0
    assert "registry-1.docker.io" in result.output, result.output
    requests = locked_mirror.wait_for_request(r"^\w+ /v2/team/app/manifests/1$", since=mark)
    assert {r.key for r in requests} == {"-"}, requests


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


@needs_podman
def test_podman_pulls_with_creds(
    podman: Podman,
    locked_mirror: TLSMirror,
    locked_mirror_key: tuple[str, str],
    client_upstreams: ClientUpstreams,
) -> None:
    app_id, key = locked_mirror_key
    reference = f"{locked_mirror.host}/ghcr.io/owner/img:tag"
    podman.pull(reference, f"--creds={app_id}:{key}").check()
    assert podman.digest(reference) == client_upstreams.img.digest


# --- containerd ------------------------------------------------------------------


@needs_containerd
@pytest.mark.parametrize(
    ("reference", "image", "repository"),
    [
        ("docker.io/library/alpine:3", "alpine", "library/alpine"),
        ("ghcr.io/owner/img:tag", "img", "owner/img"),
    ],
)
def test_containerd_hosts_toml_mirrors_a_registry_with_ns(
    containerd: Containerd,
    open_mirror: TLSMirror,
    open_mirror_hosts_dir: Path,
    client_upstreams: ClientUpstreams,
    reference: str,
    image: str,
    repository: str,
) -> None:
    """containerd asks for the repository as named at the registry, with ``?ns=REGISTRY``.

    dockmirror routes by that parameter.
    """
    registry = reference.partition("/")[0]
    mark = open_mirror.log_mark()
    containerd.pull(reference, open_mirror_hosts_dir).check()
    assert containerd.digest(reference) == getattr(client_upstreams, image).digest
    requests = open_mirror.wait_for_request(
        rf"^GET /v2/{repository}/blobs/sha256:\w+\?ns={re.escape(registry)}$", since=mark
    )
    assert all(r.uri.endswith(f"?ns={registry}") for r in requests), requests


@needs_containerd
def test_containerd_pulls_with_user(
    containerd: Containerd,
    locked_mirror: TLSMirror,
    locked_mirror_hosts_dir: Path,
    locked_mirror_key: tuple[str, str],
    client_upstreams: ClientUpstreams,
) -> None:
    """``ctr --user appId:apiKey``: containerd POSTs a password grant for its token."""
    app_id, key = locked_mirror_key
    mark = locked_mirror.log_mark()
    reference = "ghcr.io/owner/img:tag"
    containerd.pull(reference, locked_mirror_hosts_dir, f"--user={app_id}:{key}").check()
    assert containerd.digest(reference) == client_upstreams.img.digest
    requests = locked_mirror.wait_for_request(r"^POST /docker-auth/token", since=mark)
    assert app_id in {r.key for r in requests if "?ns=ghcr.io" in r.uri}


@needs_containerd
def test_containerd_pulls_anonymous_repos_without_user(
    containerd: Containerd,
    locked_mirror: TLSMirror,
    locked_mirror_hosts_dir: Path,
    client_upstreams: ClientUpstreams,
) -> None:
    """A node without credentials still pulls what ``[auth] anonymous_repos`` opens."""
    reference = "docker.io/library/alpine:3"
    containerd.pull(reference, locked_mirror_hosts_dir).check()
    assert containerd.digest(reference) == client_upstreams.alpine.digest
