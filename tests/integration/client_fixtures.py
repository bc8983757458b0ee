"""Fixtures for the real-client tests: upstream images, TLS mirrors, client daemons.

Two mirrors serve the same upstreams over TLS on ``::1``: ``open_mirror``
without required auth, and ``locked_mirror`` with ``[auth] required`` and
only Docker Hub's ``library/`` repositories open to anonymous pulls.
Daemons are module-scoped and shared by the tests of a module; the
function-scoped ``open_docker``, ``locked_docker``, ``podman`` and ``containerd``
fixtures reset their client's images (and logins) after each test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
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

if TYPE_CHECKING:
    from .conftest import Dockmirror, Seeder

__all__ = [
    "mirror_tls",
    "client_upstreams",
    "open_mirror",
    "locked_mirror",
    "locked_mirror_key",
    "open_docker_daemon",
    "open_docker",
    "locked_docker_daemon",
    "locked_docker",
    "podman_client",
    "podman",
    "containerd_daemon",
    "containerd",
    "open_mirror_hosts_dir",
    "locked_mirror_hosts_dir",
]

#: The platforms of the generated multi-arch images.
PLATFORMS: Sequence[Platform] = (
    ("linux", "amd64"),
    ("linux", "arm64", "v8"),
    ("linux", "arm", "v7"),
)
#: What ``locked_mirror`` serves without login.
ANONYMOUS_REPOS = ("dockerhub/library",)

_ACCESS_LOG = re.compile(
    r"\[dockmirror\.access#info\] (?P<client>\S+) (?P<key>\S+) (?P<method>\S+) (?P<uri>\S+) "
)


@dataclass(frozen=True)
class ClientUpstreams:
    """Two upstream registries playing Docker Hub and ghcr.io, and their images."""

    hub: Registry
    ghcr: Registry
    alpine: Image  # library/alpine:3 on hub: anonymous on the locked mirror
    app: Image  # team/app:1 on hub: needs a key on the locked mirror
    img: Image  # owner/img:tag on ghcr: needs a key on the locked mirror


@dataclass(frozen=True)
class LoggedRequest:
    """One line of dockmirror's access log; ``key`` is the appId, or "-"."""

    key: str
    method: str
    uri: str

    def __str__(self) -> str:
        return f"{self.method} {self.uri}"


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

    def requests(self, since: int = 0) -> list[LoggedRequest]:
        """The requests in the access log after ``since``."""
        return [
            LoggedRequest(match["key"], match["method"], match["uri"])
            for match in _ACCESS_LOG.finditer(self.server.log_text()[since:])
        ]

    def wait_for_request(self, pattern: str, since: int = 0) -> list[LoggedRequest]:
        """Wait until a request's ``METHOD URI`` matches ``pattern``; return all since.

        The access-log line is written as the response ends, so a client can
        be done before the line is.
        """

        def logged() -> bool:
            return any(re.search(pattern, str(r)) for r in self.requests(since))

        try:
            wait_until(logged, timeout=5.0)
        except TimeoutError:
            raise AssertionError(
                f"no request matching {pattern!r}; requests were:\n"
                + "\n".join(map(str, self.requests(since)))
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
            alpine=seeded(hub, "library/alpine", "3", layers=(4096, 1024), platforms=PLATFORMS),
            app=seeded(hub, "team/app", "1", layers=(1024,), platforms=PLATFORMS[:1]),
            img=seeded(ghcr, "owner/img", "tag", layers=(2048,), platforms=PLATFORMS[:2]),
        )


@contextmanager
def _tls_mirror(
    tmp_path_factory: pytest.TempPathFactory,
    tls: ServerTLS,
    upstreams: ClientUpstreams,
    auth: Mapping[str, Any],
) -> Iterator[TLSMirror]:
    """dockmirror over TLS on ::1 (and plain HTTP on 127.0.0.1, to see it is up)."""
    # Imported here: conftest imports this module.
    from .conftest import Dockmirror, dockmirror_config

    workdir = tmp_path_factory.mktemp("client-mirror")
    port, tls_port = free_port(), free_port_ipv6()
    server = {
        "listen": [f"tcp:{port}:interface={LOOPBACK}", tls_endpoint(tls_port, "::1", tls)],
        "public_url": f"https://{MIRROR_NAME}:{tls_port}",
    }
    tables: dict[str, dict[str, Any]] = {
        "dockerhub": {"plugin": "dockerhub", "url": upstreams.hub.url, "default": True},
        "ghcr": {"plugin": "ghcr", "url": upstreams.ghcr.url},
    }
    config = dockmirror_config(workdir, port, tables, extra={"server": server, "auth": auth})
    mirror = Dockmirror(workdir, config, port)
    mirror.start()
    try:
        yield TLSMirror(mirror, tls_port)
    finally:
        mirror.stop()


@pytest.fixture(scope="module")
def open_mirror(
    tmp_path_factory: pytest.TempPathFactory,
    mirror_tls: ServerTLS,
    client_upstreams: ClientUpstreams,
) -> Iterator[TLSMirror]:
    """dockmirror without required auth."""
    with _tls_mirror(tmp_path_factory, mirror_tls, client_upstreams, {"required": False}) as m:
        yield m


@pytest.fixture(scope="module")
def locked_mirror(
    tmp_path_factory: pytest.TempPathFactory,
    mirror_tls: ServerTLS,
    client_upstreams: ClientUpstreams,
) -> Iterator[TLSMirror]:
    """dockmirror requiring an API key except for Docker Hub's ``library/``."""
    auth = {"required": True, "anonymous_repos": list(ANONYMOUS_REPOS)}
    with _tls_mirror(tmp_path_factory, mirror_tls, client_upstreams, auth) as mirror:
        yield mirror


@pytest.fixture(scope="module")
def locked_mirror_key(locked_mirror: TLSMirror) -> tuple[str, str]:
    """(appId, apiKey) of a key made on the locked mirror."""
    from .keys import create_key  # imports conftest, which imports this module

    return create_key(locked_mirror.server, "client-tests")


@contextmanager
def _docker(
    tmp_path_factory: pytest.TempPathFactory, tls: ServerTLS, mirror: TLSMirror
) -> Iterator[Docker]:
    """dockerd trusting the mirror's CA, with ``registry-mirrors`` naming it."""
    workdir = tmp_path_factory.mktemp("dockerd")
    docker = Docker(workdir, Sandbox(workdir / "sandbox"), tls.ca, [mirror.host], [mirror.url])
    docker.start()
    try:
        yield docker
    finally:
        docker.stop()


@pytest.fixture(scope="module")
def open_docker_daemon(
    tmp_path_factory: pytest.TempPathFactory, mirror_tls: ServerTLS, open_mirror: TLSMirror
) -> Iterator[Docker]:
    with _docker(tmp_path_factory, mirror_tls, open_mirror) as docker:
        yield docker


@pytest.fixture
def open_docker(open_docker_daemon: Docker) -> Iterator[Docker]:
    """A dockerd for the open mirror; images and logins are removed after the test."""
    yield open_docker_daemon
    open_docker_daemon.reset()


@pytest.fixture(scope="module")
def locked_docker_daemon(
    tmp_path_factory: pytest.TempPathFactory, mirror_tls: ServerTLS, locked_mirror: TLSMirror
) -> Iterator[Docker]:
    with _docker(tmp_path_factory, mirror_tls, locked_mirror) as docker:
        yield docker


@pytest.fixture
def locked_docker(locked_docker_daemon: Docker) -> Iterator[Docker]:
    """A dockerd for the locked mirror; images and logins are removed after the test."""
    yield locked_docker_daemon
    locked_docker_daemon.reset()


@pytest.fixture(scope="module")
def podman_client(
    tmp_path_factory: pytest.TempPathFactory, mirror_tls: ServerTLS, open_mirror: TLSMirror
) -> Iterator[Podman]:
    """podman whose registries.conf sends docker.io and ghcr.io to the open mirror."""
    workdir = tmp_path_factory.mktemp("podman")
    registries_conf = podman_registries_conf(open_mirror.host)
    podman = Podman(workdir, Sandbox(workdir / "sandbox"), mirror_tls.ca, registries_conf)
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
    """A ``--hosts-dir`` whose docker.io and ghcr.io hosts.toml name the open mirror."""
    directory = tmp_path_factory.mktemp("containerd-hosts")
    return containerd_hosts_dir(directory, open_mirror.url, mirror_tls.ca)


@pytest.fixture(scope="module")
def locked_mirror_hosts_dir(
    tmp_path_factory: pytest.TempPathFactory, mirror_tls: ServerTLS, locked_mirror: TLSMirror
) -> Path:
    """A ``--hosts-dir`` whose docker.io and ghcr.io hosts.toml name the locked mirror."""
    directory = tmp_path_factory.mktemp("containerd-hosts")
    return containerd_hosts_dir(directory, locked_mirror.url, mirror_tls.ca)
