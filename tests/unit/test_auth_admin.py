import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockmirror import admin
from dockmirror.admin import main

CONFIG = """
[auth]
database = "{database}"
[upstreams.hub]
plugin = "dockerhub"
default = true
"""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "dockmirror.toml"
    path.write_text(CONFIG.format(database=tmp_path / "state" / "keys.sqlite"))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_create_list_revoke_rotate(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "--config", config, "keys", "create", "--name", "laptop")
    assert status == 0 and "cannot be shown again" in err
    created = json.loads(out)
    assert set(created) == {"appId", "apiKey"}

    status, out, _ = run(capsys, "--config", config, "keys", "list", "--json")
    [listed] = json.loads(out)
    assert set(listed) >= {
        "appId",
        "name",
        "createdAt",
        "lastUsedAt",
        "useCount",
        "bytesServed",
        "revoked",
    }
    assert (listed["appId"], listed["name"], listed["revoked"]) == (
        created["appId"],
        "laptop",
        False,
    )
    assert created["apiKey"] not in out

    status, out, _ = run(capsys, "--config", config, "keys", "list")
    assert out.splitlines()[0].split() == [
        "APP", "ID", "NAME", "OWNER", "CREATED", "LAST", "USED",
        "REQUESTS", "BYTES", "SENT", "STATE",
    ]  # fmt: skip
    assert (
        created["appId"] in out
        and "never" in out
        and "operator" in out
        and created["apiKey"] not in out
    )

    status, out, err = run(capsys, "--config", config, "keys", "rotate", created["appId"])
    assert status == 0
    rotated = json.loads(out)
    assert rotated["appId"] != created["appId"]
    assert f"{created['appId']} is revoked, replaced by {rotated['appId']}" in err

    status, out, _ = run(capsys, "--config", config, "keys", "revoke", rotated["appId"])
    assert (status, out) == (0, f"{rotated['appId']} is now revoked\n")
    status, out, _ = run(capsys, "--config", config, "keys", "revoke", rotated["appId"])
    assert (status, out) == (0, f"{rotated['appId']} was already revoked\n")


def test_limited_keys(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", config, "keys", "create", "--name", "ci"]
    status, out, _ = run(capsys, *argv, "--repository", "hub/myorg", "--repository", "hub/x/y")
    assert status == 0
    status, out, _ = run(capsys, "--config", config, "keys", "list", "--json")
    assert json.loads(out)[0]["repositories"] == ["hub/myorg", "hub/x/y"]
    status, _, err = run(capsys, *argv, "--repository", "ghcr/myorg")
    assert status == 2 and "'ghcr/myorg' is not UPSTREAM/PREFIX with UPSTREAM one of hub" in err


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["keys", "revoke", "app_nobody"], 1, "no key app_nobody"),
        (["keys", "rotate", "app_nobody"], 1, "no key app_nobody"),
        (["keys", "create", "--name", ""], 2, "a key name is 1 to 100 printable characters"),
    ],
)
def test_failures(
    config: str, capsys: pytest.CaptureFixture[str], argv: list[str], status: int, message: str
) -> None:
    run(capsys, "--config", config, "keys", "create", "--name", "first")
    got, out, err = run(capsys, "--config", config, *argv)
    assert (got, out) == (status, "")
    assert err == f"dockmirror-admin: {message}\n"


def test_rotating_a_revoked_key(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "--config", config, "keys", "create", "--name", "x")
    app_id = json.loads(out)["appId"]
    run(capsys, "--config", config, "keys", "revoke", app_id)
    status, _, err = run(capsys, "--config", config, "keys", "rotate", app_id)
    assert status == 1 and "is revoked; create a new key instead" in err


def test_no_database_yet(config: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = run(capsys, "--config", config, "keys", "list")
    assert status == 1 and "no key database" in err
    assert not (tmp_path / "state").exists()


def test_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "--config", str(tmp_path / "missing.toml"), "keys", "list")
    assert status == 2 and "missing.toml: no such configuration file" in err


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["keys"], ["keys", "create"], ["keys", "explode"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()


def _world_readable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o005 == 0o005 for p in (path, *path.parents))


def _python_for_everyone() -> tuple[str, dict[str, str]]:
    """An interpreter other users can run too, and the environment to find our packages.

    (An interpreter under root's home runs for root only.)
    """
    if _world_readable(Path(sys.base_prefix)):
        return sys.executable, dict(os.environ)
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        pytest.skip(f"no interpreter other users can run ({sys.base_prefix} is private)")
    path = os.pathsep.join(p for p in sys.path if p and not p.startswith(sys.base_prefix))
    return str(system), {**os.environ, "PYTHONPATH": path}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_as_root_files_belong_to_the_state_directory_owner() -> None:
    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="dockmirror-admin-"))
    try:
        top.chmod(0o755)
        state = top / "state"
        state.mkdir(mode=0o700)
        os.chown(state, nobody.pw_uid, nobody.pw_gid)
        config = top / "dockmirror.toml"
        config.write_text(CONFIG.format(database=state / "keys.sqlite"))
        config.chmod(0o600)  # root's: read before the switch
        python, env = _python_for_everyone()
        argv = [python, "-m", "dockmirror.admin", "--config", str(config), "keys"]
        created = subprocess.run(
            [*argv, "create", "--name", "ops"], capture_output=True, text=True, cwd=top, env=env
        )
        assert created.returncode == 0, created.stderr
        listed = subprocess.run([*argv, "list"], capture_output=True, text=True, cwd=top, env=env)
        assert listed.returncode == 0 and "ops" in listed.stdout
        files = list(state.iterdir())
        assert "keys.sqlite" in {f.name for f in files}
        for f in files:
            assert (f.stat().st_uid, f.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid), f
    finally:
        shutil.rmtree(top)


@pytest.fixture
def system_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing for /dev/log."""
    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
        log.bind(str(path))
        log.settimeout(0)
        monkeypatch.setattr(admin, "SYSLOG_SOCKET", str(path))
        monkeypatch.setenv("SUDO_USER", "alice")
        yield log


def received(log: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(log.recv(4096).decode())
        except BlockingIOError:
            return lines


def test_key_changes_are_audit_events_in_the_system_log(
    config: str, capsys: pytest.CaptureFixture[str], system_log: socket.socket
) -> None:
    _, out, _ = run(capsys, "--config", config, "keys", "create", "--name", "laptop")
    app_id = json.loads(out)["appId"]
    _, out, _ = run(capsys, "--config", config, "keys", "rotate", app_id)
    new = json.loads(out)["appId"]
    run(capsys, "--config", config, "keys", "revoke", new)
    run(capsys, "--config", config, "keys", "revoke", new)  # no change: no event
    run(capsys, "--config", config, "keys", "list")
    pid = os.getpid()
    assert received(system_log) == [
        f"<85>dockmirror-admin[{pid}]: key {app_id} created by alice (dockmirror-admin)"
        " audit=key-created",
        f"<85>dockmirror-admin[{pid}]: key {app_id} rotated by alice (dockmirror-admin),"
        f" replaced by {new} audit=key-rotated",
        f"<85>dockmirror-admin[{pid}]: key {new} revoked by alice (dockmirror-admin)"
        " audit=key-revoked",
    ]


def test_user_changes_are_audit_events(
    config: str, capsys: pytest.CaptureFixture[str], system_log: socket.socket
) -> None:
    run(capsys, "--config", config, "keys", "create", "--name", "laptop")  # makes the database
    assert run(capsys, "--config", config, "users", "disable", "github:Bob")[0] == 0
    assert run(capsys, "--config", config, "users", "enable", "github:bob")[0] == 0
    pid = os.getpid()
    assert received(system_log)[1:] == [
        f"<85>dockmirror-admin[{pid}]: user github:bob disabled by alice (dockmirror-admin):"
        " 0 keys revoked, 0 sessions ended audit=user-disabled",
        f"<85>dockmirror-admin[{pid}]: user github:bob enabled by alice (dockmirror-admin)"
        " audit=user-enabled",
    ]


def test_without_a_system_log_the_audit_event_goes_to_stderr(
    config: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "SYSLOG_SOCKET", str(tmp_path / "nothing"))
    status, out, err = run(capsys, "--config", config, "keys", "create", "--name", "laptop")
    assert status == 0
    assert f"key {json.loads(out)['appId']} created by " in err and "audit=key-created" in err
