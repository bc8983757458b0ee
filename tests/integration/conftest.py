"""Fixtures running real registries, a token server and the dockmirror server.

Every test under ``tests/integration`` is marked ``integration`` and skipped
when ``docker-registry`` or ``skopeo`` is not installed.  All processes listen
on 127.0.0.1 only and are killed (by process group) at fixture teardown.

Registries and the token server are session-scoped and shared, so tests must
use their own repository names (see ``unique_repo``); use ``registry_factory``
for a private registry, e.g. one to stop, or a token server to reconfigure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import pytest

from .ceph import ceph_s3, s3  # noqa: F401 - fixtures
from .client_fixtures import *  # noqa: F403 - fixtures for test_clients.py
from .clients import tls_endpoint
from .images import Image, Platform, make_image, push
from .postgres import postgres, postgres_server  # noqa: F401 - fixtures
from .registries import (
    LOOPBACK,
    ManagedProcess,
    Registry,
    RegistryMode,
    TokenServer,
    answers,
    free_port,
    subprocess_env,
)
from .relay import Relay
from .tls import cert_dir, client_context, server_tls
from .upstream_servers import PKI, TLSRegistry, make_pki

REQUIRED_TOOLS = ("docker-registry", "skopeo")
REPO_ROOT = Path(__file__).resolve().parents[2]

TomlTable = Mapping[str, Any]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark this directory's tests ``integration``; skip them if tools are missing."""
    here = Path(__file__).parent
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.integration)
            if missing:
                item.add_marker(
                    pytest.mark.skip(reason=f"integration tests need {', '.join(missing)} on PATH")
                )


# --- registries --------------------------------------------------------------


class RegistryFactory(Protocol):
    def __call__(
        self,
        mode: RegistryMode = "plain",
        *,
        token_server: TokenServer | None = None,
        **token_options: Any,
    ) -> Registry:
        """Start a registry; token mode gets its own TokenServer(**token_options) by default."""


def _registry_factory(
    stack: ExitStack, tmp_path_factory: pytest.TempPathFactory
) -> RegistryFactory:
    def make(
        mode: RegistryMode = "plain",
        *,
        token_server: TokenServer | None = None,
        **token_options: Any,
    ) -> Registry:
        if mode == "token" and token_server is None:
            token_server = stack.enter_context(
                TokenServer(tmp_path_factory.mktemp("token-server"), **token_options)
            )
        registry = Registry(
            tmp_path_factory.mktemp(f"{mode}-registry"), mode, token_server=token_server
        )
        return stack.enter_context(registry)

    return make


@pytest.fixture(scope="session")
def _session_registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryFactory]:
    with ExitStack() as stack:
        yield _registry_factory(stack, tmp_path_factory)


@pytest.fixture
def registry_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryFactory]:
    """Start private registries (and token servers) that live for one test."""
    with ExitStack() as stack:
        yield _registry_factory(stack, tmp_path_factory)


@pytest.fixture(scope="session")
def plain_registry(_session_registries: RegistryFactory) -> Registry:
    """A shared registry without authentication."""
    return _session_registries("plain")


@pytest.fixture(scope="session")
def other_registry(_session_registries: RegistryFactory) -> Registry:
    """A second shared registry without authentication, apart from ``plain_registry``."""
    return _session_registries("plain")


@pytest.fixture(scope="session")
def htpasswd_registry(_session_registries: RegistryFactory) -> Registry:
    """A shared registry with Basic auth; ``.creds`` is the valid user."""
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd (apache2-utils) is not on PATH")
    return _session_registries("htpasswd")


@pytest.fixture(scope="session")
def token_registry(_session_registries: RegistryFactory) -> Registry:
    """A shared registry with token auth via ``.token_server`` (anonymous pull allowed)."""
    return _session_registries("token")


class RelayFactory(Protocol):
    def __call__(self, registry: Registry) -> Relay:
        """Start a :class:`Relay` in front of ``registry``."""


@pytest.fixture
def relay() -> Iterator[RelayFactory]:
    """Fault-injecting relays in front of registries (see :mod:`.relay`); stopped after the test.

    Example::

        upstream = relay(registry)
        upstream.faults.append(Fault(r"/blobs/", rate=2 << 20))
        mirror = dockmirror({"hub": {"plugin": "registry", "url": upstream.url, "default": True}})
    """
    with ExitStack() as stack:

        def make(registry: Registry) -> Relay:
            return stack.enter_context(Relay(registry.port))

        yield make


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA, and the server and client certificates it signed."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_registry(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRegistry]:
    """A registry serving TLS with a certificate of :func:`pki`'s CA."""
    with TLSRegistry(tmp_path_factory.mktemp("tls-registry"), pki) as registry:
        yield registry


@pytest.fixture
def unique_repo(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses, derived from the test name."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"test/{name}-{uuid.uuid4().hex[:8]}"


class Seeder:
    """Generates a fresh random image and pushes it (with the registry's creds)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp_path_factory = tmp_path_factory

    def __call__(
        self,
        registry: Registry,
        repo: str,
        tag: str = "latest",
        *,
        layers: Sequence[int] = (1024,),
        platforms: Sequence[Platform] | None = None,
        docker_media_types: bool = False,
    ) -> Image:
        """Generate an image and push it to ``registry`` as ``repo:tag``."""
        layout = self._tmp_path_factory.mktemp("oci-layout")
        image = make_image(layout, tag, layers, platforms, docker_media_types=docker_media_types)
        push(layout, tag, registry.host, repo, registry.creds)
        return image


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeder:
    return Seeder(tmp_path_factory)


# --- dockmirror --------------------------------------------------------------


#: The ``twistd`` of the environment running the tests: the server as it ships.
TWISTD = str(Path(sys.executable).with_name("twistd"))


class Dockmirror:
    """A ``twistd --nodaemon dockmirror`` server process on 127.0.0.1.

    With ``tls``, the listener at ``port`` is TLS with the test CA's
    certificate (:mod:`.tls`), and ``url`` is ``https://``.
    """

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, TomlTable],
        port: int,
        *,
        tls: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port
        self.tls = tls
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "dockmirror.toml"
        self.config_path.write_text(toml_document(config))
        self._argv = [
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            "dockmirror",
            "--config",
            str(self.config_path),
        ]
        self._process = ManagedProcess(
            self._argv,
            log_path=workdir / "dockmirror.log",
            cwd=workdir,
            env=subprocess_env(
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.getenv("PYTHONPATH")])),
                PYTHONUNBUFFERED="1",
                **(env or {}),
            ),
        )

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in image references."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def cert_dir(self) -> Path | None:
        """What skopeo's ``--src-cert-dir`` needs to verify this server (None: plain HTTP)."""
        return cert_dir() if self.tls else None

    @property
    def cache_dir(self) -> Path:
        return Path(self.config["cache"]["directory"])

    @property
    def database_path(self) -> Path:
        return Path(self.config["auth"]["database"])

    @property
    def running(self) -> bool:
        return self._process.running

    @property
    def pid(self) -> int:
        """The process ID of what was started (twistd, or the command that wraps it)."""
        return self._process.pid

    def wrap(self, prefix: list[str]) -> None:
        """Start the server through a command that execs it (e.g. ``prlimit ... --``)."""
        self.run_under(*prefix)

    def start(self) -> None:
        """Start and wait (up to 20 s) until ``/v2/`` answers with any status."""
        context = client_context() if self.tls else None
        self._process.start(lambda: answers(f"{self.url}/v2/", context), timeout=20.0)

    def run_under(self, *wrapper: str) -> None:
        """From the next start on, run the server as ``WRAPPER... twistd ...``.

        For strace, or ``unshare`` into a private mount namespace; no
        arguments: run it plainly again.
        """
        self._process.argv = [*wrapper, *self._argv]

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after 10 s)."""
        self._process.stop()

    def send_signal(self, signum: signal.Signals) -> None:
        self._process.send_signal(signum)

    def kill9(self) -> None:
        """Kill immediately with SIGKILL, as a crash would."""
        self._process.kill9()

    def restart(self) -> None:
        """Stop (if running) and start again with the same config, port and cache."""
        self._process.stop()
        self.start()

    def log_text(self) -> str:
        """Output of all runs so far."""
        return self._process.log_text()


class DockmirrorFactory:
    """Makes dockmirror servers in fresh directories; they are stopped with *stack*."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, stack: ExitStack) -> None:
        self._tmp_path_factory = tmp_path_factory
        self._stack = stack

    def __call__(
        self,
        upstreams: Mapping[str, TomlTable],
        *,
        auth_required: bool = False,
        extra: Mapping[str, TomlTable] | None = None,
        start: bool = True,
        tls: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Dockmirror:
        """Configure (and by default start) a dockmirror server; ``tls``: over TLS.

        ``env`` is added to its environment (which has no proxy variables otherwise).
        """
        workdir = self._tmp_path_factory.mktemp("dockmirror")
        port = free_port()
        config = dockmirror_config(
            workdir, port, upstreams, auth_required=auth_required, extra=extra, tls=tls
        )
        mirror = Dockmirror(workdir, config, port, tls=tls, env=env)
        self._stack.callback(mirror.stop)
        if start:
            mirror.start()
        return mirror


@pytest.fixture
def dockmirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockmirrorFactory]:
    """Start dockmirror servers for ``[upstreams.NAME]`` tables; killed after the test.

    ``[server]``, ``[auth]`` and ``[cache]`` are filled in (fresh port, key
    database and cache directory); ``extra`` tables are merged over them key
    by key.  Example::

        mirror = dockmirror({"hub": {"plugin": "dockerhub", "url": registry.url, "default": True}})
    """
    with ExitStack() as stack:
        yield DockmirrorFactory(tmp_path_factory, stack)


def dockmirror_config(
    workdir: Path,
    port: int,
    upstreams: Mapping[str, TomlTable],
    *,
    auth_required: bool = False,
    extra: Mapping[str, TomlTable] | None = None,
    tls: bool = False,
) -> dict[str, dict[str, Any]]:
    """The dockmirror configuration as nested tables (see :func:`toml_document`).

    With ``tls`` the listener serves the test CA's certificate (:mod:`.tls`).
    """
    listen = (
        tls_endpoint(port, LOOPBACK, server_tls()) if tls else f"tcp:{port}:interface={LOOPBACK}"
    )
    config: dict[str, dict[str, Any]] = {
        "server": {
            "listen": [listen],
            "public_url": f"{'https' if tls else 'http'}://{LOOPBACK}:{port}",
        },
        "auth": {"required": auth_required, "database": str(workdir / "keys.sqlite")},
        "cache": {"directory": str(workdir / "cache")},
        "upstreams": {name: dict(table) for name, table in upstreams.items()},
    }
    for name, table in (extra or {}).items():
        config.setdefault(name, {}).update(table)
    return config


def toml_document(tables: Mapping[str, TomlTable]) -> str:
    """Serialize nested tables of str/bool/int/float/lists to TOML."""
    lines: list[str] = []
    _toml_table(lines, [], tables)
    return "\n".join(lines) + "\n"


def _toml_table(lines: list[str], path: list[str], table: TomlTable) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    if path and (scalars or not table):
        header = f"[{'.'.join(_toml_key(part) for part in path)}]"
        lines.extend([header] if not lines else ["", header])
    lines.extend(f"{_toml_key(key)} = {_toml_value(value)}" for key, value in scalars.items())
    for key, value in table.items():
        if isinstance(value, Mapping):
            _toml_table(lines, [*path, key], value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        pairs = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + pairs + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
