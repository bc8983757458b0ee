"""A real PostgreSQL server (Debian's ``postgresql`` package) on loopback.

One server per test session; each test that asks for ``postgres`` gets a
database of its own.  initdb refuses to run as root, so as root the server
runs as ``nobody`` in a directory that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .registries import LOOPBACK, ManagedProcess, free_port, subprocess_env

USER = "dockmirror"


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> int:
    return int(Path(path).parts[-3])


class PostgresServer:
    """A PostgreSQL server in *directory*, that tests may stop and start again."""

    def __init__(self, directory: Path) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.directory = directory
        self.port = free_port()
        data = directory / "data"
        as_user: list[str] = []
        if os.getuid() == 0:
            as_user = ["runuser", "-u", "nobody", "--"]
            shutil.chown(directory, "nobody")
        env = subprocess_env(LC_ALL="C.UTF-8")
        subprocess.run(
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", USER],
            check=True,
            capture_output=True,
            env=env,
        )
        self.process = ManagedProcess(
            [
                *as_user,
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-k",
                str(directory),
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={LOOPBACK}",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=300",
            ],
            log_path=directory / "postgres.log",
            cwd=directory,
            env=env,
        )
        self._psql = [str(bin_dir.parent / "bin" / "psql")]
        if not Path(self._psql[0]).exists():
            self._psql = ["psql"]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@{LOOPBACK}:{self.port}/{database}"

    def start(self) -> None:
        self.process.start(lambda: self._ready(), timeout=30)

    def stop(self) -> None:
        self.process.stop()

    def _ready(self) -> bool:
        return (
            subprocess.run(
                [*self._psql, "-q", "-d", self.url(), "-c", "SELECT 1"],
                capture_output=True,
                env=subprocess_env(),
            ).returncode
            == 0
        )

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run *statement* with psql; its unaligned, tuples-only output."""
        done = subprocess.run(
            [*self._psql, "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.url(database)],
            input=statement,
            capture_output=True,
            text=True,
            env=subprocess_env(),
            check=True,
        )
        return done.stdout.strip()

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (skipped, or failed in strict mode, if not installed)."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # Not under pytest's base directory: as root, that is closed to the server's user.
    directory = Path(tempfile.mkdtemp(prefix="dockmirror-postgres-"))
    os.chmod(directory, 0o755)
    try:
        server = PostgresServer(directory)
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> str:
    """The URL of an empty database of its own for this test."""
    if not postgres_server.process.running:
        postgres_server.start()  # an earlier test stopped it
    return postgres_server.create_database()
