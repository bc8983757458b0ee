"""Fixtures for the real-client tests: upstream images, the TLS mirror, client daemons.

Daemons are module-scoped and shared by the tests of a module; the
function-scoped ``docker``, ``podman`` and ``containerd`` fixtures reset
their client's images (and logins) after each test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .clients import (
    MIRROR_NAME,
    Containerd,
    Docker,
    Podman,
    Sandbox,
    ServerTLS,
    containerd_hosts_dir,
    free_port_ipv6,
    make_server_tls,
    podman_registries_conf,
    tls_endpoint,
    unavailable,
)
from .images import Image, Platform
from .registries import LOOPBACK, Registry, TokenServer, free_port, wait_until

__all__ = [
    "mirror_tls",
    "client_upstreams",
    "open_mirror",
    "docker_daemon",
    "docker",
    "podman_client",
    "podman",
    "containerd_daemon",
    "containerd",
    "open_mirror_hosts_dir",
]

if TYPE_CHECKING:
    from .conftest import Dockmirror, Seeder

#: The platforms of the generated multi-arch images.
PLATFORMS: Sequence[Platform] = (
    ("linux", "amd64"),
    ("linux", "arm64", "v8"),
    ("linux", "arm", "v7"),
)

_ACCESS_LOG = re.compile(
    r"\[dockmirror\.access#info\] (?P<client>\S+) (?P<key>\S+) (?P<method>\S+) (?P<uri>\S+) "
)


@dataclass(frozen=True)
class ClientUpstreams:
    """Two upstream registries playing Docker Hub and ghcr.io, and their images."""

    hub: Registry
    ghcr: Registry
    alpine: Image  # library/alpine:3 on hub
    img: Image  # owner/img:tag on ghcr


@dataclass(frozen=True)
class TLSMirror:
    """A dockmirror process serving TLS on ``[::1]:port``, reached as ``mirror.test:port``."""

    server: Dockmirror
    port: int

    @property
    def host(self) -> str:
        return f"{MIRROR_NAME}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def log_mark(self) -> int:
        """The current end of the log: requests after it are "new"."""
        return len(self.server.log_text())

    def requests(self, since: int = 0) -> list[str]:
        """``METHOD URI`` of each request in the access log after ``since``."""
        return [
            f"{match['method']} {match['uri']}"
            for match in _ACCESS_LOG.finditer(self.server.log_text()[since:])
        ]

    def wait_for_request(self, pattern: str, since: int = 0) -> list[str]:
        """Wait until a logged request matches the regex ``pattern``; return all since.

        The access-log line is written as the response ends, so a client can
        be done before the line is.
        """
        try:
            wait_until(
                lambda: any(re.search(pattern, r) for r in self.requests(since)), timeout=5.0
            )
        except TimeoutError:
            raise AssertionError(
                f"no request matching {pattern!r}; requests were:\n"
                + "\n".join(self.requests(since))
            ) from None
        return self.requests(since)


def requires_clients(*programs: str) -> pytest.MarkDecorator:
    """Skip a test, saying why, unless it can run ``programs`` as root in a namespace."""
    reason = unavailable(*programs)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.fixture(scope="session")
def mirror_tls(tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    """A test CA and the mirror's certificate (mirror.test, localhost, 127.0.0.1, ::1)."""
    return make_server_tls(tmp_path_factory.mktemp("mirror-tls"), MIRROR_NAME)


@pytest.fixture(scope="module")
def client_upstreams(
    tmp_path_factory: pytest.TempPathFactory, seeded: Seeder
) -> Iterator[ClientUpstreams]:
    """Token-auth registries as Docker Hub and ghcr.io, with multi-arch images pushed."""
    with ExitStack() as stack:
        token_server = stack.enter_context(TokenServer(tmp_path_factory.mktemp("client-tokens")))
        hub, ghcr = (
            stack.enter_context(
                Registry(tmp_path_factory.mktemp(name), "token", token_server=token_server)
            )
            for name in ("client-hub", "client-ghcr")
        )
        yield ClientUpstreams(
            hub,
            ghcr,
            seeded(hub, "library/alpine", "3", layers=(4096, 1024), platforms=PLATFORMS),
            seeded(ghcr, "owner/img", "tag", layers=(2048,), platforms=PLATFORMS[:2]),
        )


@pytest.fixture(scope="module")
def open_mirror(
    tmp_path_factory: pytest.TempPathFactory,
    mirror_tls: ServerTLS,
    client_upstreams: ClientUpstreams,
) -> Iterator[TLSMirror]:
    """dockmirror without required auth, over TLS on ::1 (plain HTTP on 127.0.0.1 too)."""
    # Imported here: conftest imports this module's fixtures.
    from .conftest import Dockmirror, dockmirror_config

    workdir = tmp_path_factory.mktemp("client-mirror")
    port, tls_port = free_port(), free_port_ipv6()
    upstreams: dict[str, dict[str, Any]] = {
        "dockerhub": {"plugin": "dockerhub", "url": client_upstreams.hub.url, "default": True},
        "ghcr": {"plugin": "ghcr", "url": client_upstreams.ghcr.url},
    }
    server = {
        "listen": [
            f"tcp:{port}:interface={LOOPBACK}",
            tls_endpoint(tls_port, "::1", mirror_tls),
        ],
        "public_url": f"https://{MIRROR_NAME}:{tls_port}",
    }
    config = dockmirror_config(workdir, port, upstreams, extra={"server": server})
    mirror = Dockmirror(workdir, config, port)
    mirror.start()
    try:
        yield TLSMirror(mirror, tls_port)
    finally:
        mirror.stop()


@pytest.fixture(scope="module")
def docker_daemon(
    tmp_path_factory: pytest.TempPathFactory, mirror_tls: ServerTLS, open_mirror: TLSMirror
) -> Iterator[Docker]:
    """dockerd trusting the mirror's CA, with ``registry-mirrors`` naming it."""
    workdir = tmp_path_factory.mktemp("dockerd")
    docker = Docker(
        workdir, Sandbox(workdir / "sandbox"), mirror_tls.ca, [open_mirror.host], [open_mirror.url]
    )
    docker.start()
    try:
        yield docker
    finally:
        docker.stop()


@pytest.fixture
def docker(docker_daemon: Docker) -> Iterator[Docker]:
    """The shared dockerd; its images and logins are removed after the test."""
    yield docker_daemon
    docker_daemon.reset()


@pytest.fixture(scope="module")
def podman_client(
    tmp_path_factory: pytest.TempPathFactory, mirror_tls: ServerTLS, open_mirror: TLSMirror
) -> Iterator[Podman]:
    """podman whose registries.conf sends docker.io and ghcr.io to the mirror."""
    workdir = tmp_path_factory.mktemp("podman")
    podman = Podman(
        workdir,
        Sandbox(workdir / "sandbox"),
        mirror_tls.ca,
        podman_registries_conf(open_mirror.host),
    )
    try:
        yield podman
    finally:
        podman.remove_storage()


@pytest.fixture
def podman(podman_client: Podman) -> Iterator[Podman]:
    """The shared podman storage; its images are removed after the test."""
    yield podman_client
    podman_client.reset()


@pytest.fixture(scope="module")
def containerd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A private containerd."""
    workdir = tmp_path_factory.mktemp("containerd")
    containerd = Containerd(workdir, Sandbox(workdir / "sandbox"))
    containerd.start()
    try:
        yield containerd
    finally:
        containerd.stop()


@pytest.fixture
def containerd(containerd_daemon: Containerd) -> Iterator[Containerd]:
    """The shared containerd; its images are removed after the test."""
    yield containerd_daemon
    containerd_daemon.reset()


@pytest.fixture(scope="module")
def open_mirror_hosts_dir(
    tmp_path_factory: pytest.TempPathFactory, mirror_tls: ServerTLS, open_mirror: TLSMirror
) -> Path:
    """A ``--hosts-dir`` with hosts.toml for docker.io and ghcr.io naming the mirror."""
    return containerd_hosts_dir(
        tmp_path_factory.mktemp("containerd-hosts"), open_mirror.url, mirror_tls.ca
    )
