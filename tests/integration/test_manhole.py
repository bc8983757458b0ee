"""The SSH manhole, driven by the real OpenSSH client."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from .conftest import Dockmirror, DockmirrorFactory
from .keys import list_keys
from .registries import LOOPBACK, Registry, free_port, subprocess_env, wait_until

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the ssh client")

#: CSI and other escape sequences the manhole's terminal handling writes.
_ESCAPES = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|[()][0-9A-Za-z]|[=>EDM78c])")


def keypair(directory: Path, name: str) -> Path:
    path = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True
    )
    return path


def fingerprint(key: Path) -> str:
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", f"{key}.pub"],
        capture_output=True,
        text=True,
        check=True,
    )
    return listed.stdout.split()[1]


class Session:
    """An ``ssh -tt`` session into the manhole, its output collected as it comes."""

    def __init__(self, port: int, identity: Path) -> None:
        self._process = subprocess.Popen(
            [
                "ssh",
                "-tt",
                "-p",
                str(port),
                "-i",
                str(identity),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                f"operator@{LOOPBACK}",
            ],  # fmt: skip
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )
        self._output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        while chunk := self._process.stdout.read1(65536):
            self._output += chunk

    @property
    def text(self) -> str:
        return _ESCAPES.sub(b"", bytes(self._output)).decode("utf-8", "replace")

    def send(self, line: str) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(line.encode() + b"\r")
        self._process.stdin.flush()

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        try:
            wait_until(lambda: re.search(pattern, self.text) is not None, timeout, 0.05)
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} in:\n{self.text}") from None
        match = re.search(pattern, self.text)
        assert match is not None
        return match

    def close(self) -> int:
        """Leave with ^D, as at an interactive prompt; the exit status."""
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.write(b"\x04")
            self._process.stdin.flush()
        try:
            return self._process.wait(timeout=15)
        finally:
            self._process.kill()
            self._reader.join(timeout=5)


@pytest.fixture
def manhole(
    plain_registry: Registry, dockmirror: DockmirrorFactory, tmp_path: Path
) -> tuple[Dockmirror, int, Path]:
    """A mirror with a manhole; its port, and the authorized_keys file (empty)."""
    port = free_port()
    authorized = tmp_path / "authorized_keys"
    authorized.write_text("")
    mirror = dockmirror(
        {"hub": {"plugin": "dockerhub", "url": plain_registry.url, "default": True}},
        auth_required=True,
        extra={
            "manhole": {
                "listen": f"tcp:{port}:interface={LOOPBACK}",
                "authorized_keys": str(authorized),
            }
        },
    )
    return mirror, port, authorized


def test_session_with_authorized_key(manhole: tuple[Dockmirror, int, Path], tmp_path: Path) -> None:
    mirror, port, authorized = manhole
    operator = keypair(tmp_path, "operator")
    authorized.write_text(
        "# the operators\n" + Path(f"{operator}.pub").read_text() + "not a key line\n"
    )
    session = Session(port, operator)
    try:
        session.expect(">>> ")
        session.send('keys.create("from the manhole")')
        created = session.expect(
            r"Deferred #0 called back: <new key 'from the manhole':"
            r" appId (app_\w+) apiKey (sk_\S+)>"
        )
        session.send("keys.list()")
        session.expect(r"Deferred #1 called back: 1 keys\s+<key app_\w+ 'from the manhole' active")
        session.send("keys.stats()")
        session.expect(r"Deferred #2 called back: \{'keys': 1, 'active': 1")
        session.send('keys.revoke("app_nonexistent")')
        session.expect(r"Deferred #3 failed: 'no key app_nonexistent'")
        session.send("keys")
        session.expect(r"<keys: list\(\), create\(name, repositories=None\)")
        session.send("upstreams")
        session.expect(r"\{'hub': <upstream hub \(dockerhub\) http://127\.0\.0\.1:\d+>\}")
        session.send("endpoints")
        session.expect(r"\{'hub': <endpoints of hub: 127\.0\.0\.1:\d+ closed>\}")
        session.send("config.auth.required, config.auth.token_ttl")
        session.expect(r"\(True, 300\)")
        assert session.close() == 0
    finally:
        session.close()
    app_id = created.group(1)
    assert list_keys(mirror)[app_id]["name"] == "from the manhole"
    assert f"manhole login as operator with key {fingerprint(operator)}" in mirror.log_text()


def test_strangers_are_refused(manhole: tuple[Dockmirror, int, Path], tmp_path: Path) -> None:
    mirror, port, authorized = manhole
    operator, stranger = keypair(tmp_path, "operator"), keypair(tmp_path, "stranger")
    authorized.write_text(Path(f"{operator}.pub").read_text())
    session = Session(port, stranger)
    status = session.close()
    assert status == 255
    assert "Permission denied (publickey)" in session.text  # no password method offered
    assert f"manhole login as operator refused for key {fingerprint(stranger)}" in mirror.log_text()
    # The file is read again at each login: the stranger, once added, gets in.
    authorized.write_text(authorized.read_text() + Path(f"{stranger}.pub").read_text())
    session = Session(port, stranger)
    try:
        session.expect(">>> ")
    finally:
        session.close()


def test_host_key_is_kept(
    manhole: tuple[Dockmirror, int, Path],
) -> None:
    mirror, port, _ = manhole
    host_key = mirror.database_path.parent / "manhole_host_key"
    assert host_key.stat().st_mode & 0o777 == 0o600
    before = host_key.read_bytes()
    mirror.restart()
    wait_until(lambda: _port_open(port), timeout=10)
    assert host_key.read_bytes() == before


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex((LOOPBACK, port)) == 0


def test_connections_beyond_the_cap_are_closed(manhole: tuple[Dockmirror, int, Path]) -> None:
    mirror, port, _ = manhole
    idle = [socket.create_connection((LOOPBACK, port), timeout=10) for _ in range(10)]
    try:
        for sock in idle:
            assert sock.recv(100).startswith(b"SSH-2.0-")
        extra = socket.create_connection((LOOPBACK, port), timeout=10)
        with extra:
            assert extra.recv(100) == b""  # closed without a word
        wait_until(lambda: "10 connections already open" in mirror.log_text(), 5)
    finally:
        for sock in idle:
            sock.close()

    # Once they are gone, a connection is served again.
    def served() -> bool:
        with socket.create_connection((LOOPBACK, port), timeout=10) as again:
            return again.recv(100).startswith(b"SSH-2.0-")

    wait_until(served, 5)
