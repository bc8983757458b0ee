import json
from pathlib import Path

import pytest

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
