from pathlib import Path

import pytest

from dockmirror.config import ConfigError, check_repository_prefix, load

UPSTREAMS = """
[upstreams.dockerhub]
plugin = "dockerhub"
default = true
[upstreams.ghcr]
plugin = "ghcr"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dockmirror.toml"
    path.write_text(text + UPSTREAMS)
    return str(path)


def test_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, ""))
    assert config.auth.token_ttl == 300
    assert config.auth.anonymous_repos == ()
    assert config.manhole.listen is None


def test_auth_and_manhole_keys(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[auth]
required = true
token_ttl = 600
anonymous_repos = ["dockerhub/library", "ghcr"]
[manhole]
listen = "tcp:2222:interface=127.0.0.1"
authorized_keys = "/etc/dockmirror/manhole_keys"
""",
        )
    )
    assert config.auth.token_ttl == 600
    assert config.auth.anonymous_repos == ("dockerhub/library", "ghcr")
    assert config.manhole.listen == "tcp:2222:interface=127.0.0.1"
    assert config.manhole.authorized_keys == "/etc/dockmirror/manhole_keys"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[auth]\ntoken_ttl = 0", "auth.token_ttl must be between 1 and 3600 seconds"),
        ("[auth]\ntoken_ttl = 86400", "auth.token_ttl must be between 1 and 3600 seconds"),
        ('[auth]\ntoken_ttl = "5m"', "auth.token_ttl must be an integer"),
        (
            '[auth]\nanonymous_repos = ["library"]',
            "auth.anonymous_repos: 'library' is not UPSTREAM/PREFIX with UPSTREAM one of"
            " dockerhub, ghcr",
        ),
        ('[auth]\nanonymous_repos = ["dockerhub/Bad"]', "'dockerhub/Bad' is not UPSTREAM/PREFIX"),
        ('[auth]\nanonymous_repos = "dockerhub"', "auth.anonymous_repos must be a list"),
        ('[manhole]\nlisten = "tcp:2222"', "manhole.authorized_keys is required"),
        ("[manhole]\nport = 2222", "unknown key manhole.port"),
    ],
)
def test_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="dockmirror.toml") as info:
        load(write(tmp_path, text))
    assert message in str(info.value)


def test_check_repository_prefix() -> None:
    upstreams = ["dockerhub", "ghcr"]
    assert check_repository_prefix("ghcr", upstreams) == "ghcr"
    assert check_repository_prefix("ghcr/org/team", upstreams) == "ghcr/org/team"
    for bad in ("", "quay/x", "ghcr/", "ghcr//x", "ghcr/../x", "ghcr.io/org"):
        with pytest.raises(ValueError):
            check_repository_prefix(bad, upstreams)
