import re
from pathlib import Path

import pytest

from dockmirror.config import ConfigError, _build, config_warnings, load

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dockmirror.toml"
    path.write_text(text)
    return str(path)


def test_embedded_default() -> None:
    config = load(None)
    assert config.server.listen == ("tcp:5000:interface=127.0.0.1",)
    assert config.auth.required is False
    assert {u.plugin for u in config.upstreams.values()} == {
        "dockerhub",
        "ghcr",
        "quay",
        "gcr",
        "k8s",
    }
    assert [n for n, u in config.upstreams.items() if u.default] == ["dockerhub"]


def test_shipped_example_is_valid() -> None:
    config = load(str(REPO / "etc" / "dockmirror.toml"))
    assert config.auth.required is True
    assert [u.plugin for u in config.upstreams.values() if u.default] == ["dockerhub"]


def test_full_file(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[server]
listen = ["tcp:5000"]
public_url = "https://mirror.example.com"
[upstreams.corp]
plugin = "registry"
url = "https://r.corp.example"
aliases = ["corp.example"]
hosts = ["corp.mirror.example.com"]
username = "u"
password = "p"
""",
        )
    )
    corp = config.upstreams["corp"]
    assert corp.aliases == ("corp.example",)
    assert (corp.username, corp.password) == ("u", "p")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nlisten = 5000\n", "server.listen must be a list of strings"),
        ("[server]\nlisen = []\n", "unknown key server.lisen"),
        ("[nope]\n", "unknown section [nope]"),
        ("[auth]\nrequired = 'yes'\n", "auth.required must be a boolean"),
        ("[upstreams.x]\nurl = 'http://a'\n", "missing key upstreams.x.plugin"),
        ("[upstreams.x]\nplugin = 'nope'\n", "upstreams.x.plugin: unknown plugin 'nope'"),
        ("[upstreams.x]\nplugin = 'registry'\n", "upstreams.x.url is required"),
        (
            "[upstreams.a]\nplugin='quay'\ndefault=true\n[upstreams.b]\nplugin='ghcr'\ndefault=true\n",
            "only one upstream may be the default",
        ),
        ("[upstreams.a]\nplugin='quay'\nusername='u'\n", "username and password go together"),
        ("[upstreams.a]\nplugin='quay'\nurl='ftp://x'\n", "upstreams.a.url must be an http(s) URL"),
        ("[upstreams.a]\nplugin='quay'\ntimeout=3\n", "unknown key upstreams.a.timeout"),
        ("not toml [", "not valid TOML"),
        ('[upstreams."a/b"]\nplugin = "quay"\n', "[upstreams.a/b]: an upstream name is"),
    ],
)
def test_errors_name_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert message in str(e.value)
    assert str(e.value).startswith(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"aliases": ["*.*.corp"]}, "upstreams.u.aliases: '*.*.corp' is not a host name"),
        ({"aliases": ["10.0.0.1"]}, "upstreams.u.aliases: '10.0.0.1' is not a host name"),
        ({"hosts": ["mirror:5000"]}, "upstreams.u.hosts: 'mirror:5000' is not a host name"),
        ({"token_realms": ["auth.corp"]}, "upstreams.u.token_realms: 'auth.corp' is not an origin"),
        ({"url": "https://u:p@registry.corp"}, "upstreams.u.url: "),
    ],
)
def test_upstream_names_are_checked(table: dict[str, object], message: str) -> None:
    data = {"upstreams": {"u": {"plugin": "registry", "url": "https://registry.corp", **table}}}
    with pytest.raises(ConfigError, match=re.escape(message)):
        _build("t.toml", data)


def test_secrets_are_redacted_in_reprs(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[upstreams.corp]
plugin = "registry"
url = "https://registry.corp.example"
username = "mirror"
password = "hunter2-secret"
""",
        )
    )
    upstream = config.upstreams["corp"]
    assert upstream.password == "hunter2-secret"
    for text in (repr(upstream), repr(config), str(config)):
        assert "hunter2" not in text
        assert "password='***'" in text and "username='mirror'" in text
    assert "password=None" in repr(load(None).upstreams["dockerhub"])


def test_warns_of_credentials_over_plain_http(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[upstreams.plain]
plugin = "registry"
url = "http://registry.corp.example"
username = "mirror"
password = "pw"

[upstreams.tls]
plugin = "registry"
url = "https://registry.corp.example"
username = "mirror"
password = "pw"

[upstreams.anonymous]
plugin = "registry"
url = "http://other.corp.example"
""",
        )
    )
    [warning] = config_warnings(config)
    assert warning.startswith("upstreams.plain: credentials go to http://registry.corp.example")
    assert config_warnings(load(None)) == []
