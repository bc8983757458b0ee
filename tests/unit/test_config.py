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


def test_mirrors_as_urls_or_tables(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[upstreams.hub]
plugin = "dockerhub"
mirrors = [
  "https://mirror.gcr.io",
  { url = "https://hub.corp.example", username = "u", password = "s3cret", trust_tags = true },
]
""",
        )
    )
    first, second = config.upstreams["hub"].mirrors
    assert (first.url, first.username, first.trust_tags) == ("https://mirror.gcr.io", None, False)
    assert (second.username, second.password, second.trust_tags) == ("u", "s3cret", True)
    assert "s3cret" not in repr(config.upstreams["hub"])


@pytest.mark.parametrize(
    ("mirrors", "message"),
    [
        ('["ftp://m.example"]', r"mirrors\[0\]: 'ftp://m.example' is not an http\(s\) URL"),
        ('["https://u:p@m.example"]', r"mirrors\[0\].*without credentials"),
        ('["https://m.example:x"]', r"mirrors\[0\].*bad port"),
        ('["https://m.example", "https://m.example:443/"]', r"mirrors\[1\]: m.example:443 is al"),
        ('["https://registry-1.docker.io"]', r"mirrors\[0\]: registry-1.docker.io:443 is al"),
        ('[{ url = "https://m.example", username = "u" }]', "username and password go"),
        ('[{ url = "https://m.example", trust = true }]', r"unknown key .*mirrors\[0\]\.trust"),
        ('[{ url = "https://m.example", trust_tags = "yes" }]', "trust_tags must be a boolean"),
        ("[1]", r"mirrors\[0\] must be a URL or a table"),
        ('"https://m.example"', "mirrors must be a list"),
    ],
)
def test_bad_mirrors(tmp_path: Path, mirrors: str, message: str) -> None:
    text = f'[upstreams.hub]\nplugin = "dockerhub"\nmirrors = {mirrors}\n'
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text))


def test_proxy_keys(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[upstreams.hub]
plugin = "dockerhub"
proxy = "http://user:hunter2@proxy.corp:3128"
no_proxy = ["10.0.0.0/8", ".corp"]
[upstreams.quay]
plugin = "quay"
proxy = "http://proxy.corp:3128"
proxy_username = "user"
proxy_password = "hunter3"
[upstreams.ghcr]
plugin = "ghcr"
proxy = "none"
""",
        )
    )
    text = repr(config.upstreams)
    assert "hunter2" not in text and "hunter3" not in text
    assert "proxy='http://user:***@proxy.corp:3128'" in text


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('proxy = "https://p:3128"', r"upstreams\.hub\.proxy 'https://p:3128': .*http://"),
        ('proxy = "http://u:hunter2@p:x"', r"proxy 'http://u:\*\*\*@p:x': .*port"),
        ('proxy = "http://p:1"\nproxy_username = "u"', "proxy_username and proxy_password go"),
        ('proxy_username = "u"\nproxy_password = "p"', "need a proxy"),
        ('no_proxy = ["x"]', "need a proxy"),
    ],
)
def test_bad_proxy_keys(tmp_path: Path, keys: str, message: str) -> None:
    text = f'[upstreams.hub]\nplugin = "dockerhub"\n{keys}\n'
    with pytest.raises(ConfigError, match=message) as info:
        load(write(tmp_path, text))
    assert "hunter2" not in str(info.value)


def test_parallel_fetch_keys(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[upstreams.hub]
plugin = "dockerhub"
parallel_min_size = "100MB"
parallel_parts = 8
[upstreams.quay]
plugin = "quay"
parallel_parts = 1
[upstreams.ghcr]
plugin = "ghcr"
""",
        )
    )
    hub, quay, ghcr = (config.upstreams[n] for n in ("hub", "quay", "ghcr"))
    assert (hub.parallel_min_bytes, hub.parallel_parts) == (100_000_000, 8)
    assert (quay.parallel_min_bytes, quay.parallel_parts) == (32 << 20, 1)
    assert (ghcr.parallel_min_bytes, ghcr.parallel_parts) == (32 << 20, 4)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("parallel_parts = 0", r"upstreams\.hub\.parallel_parts must be a number from 1"),
        ("parallel_parts = 17", r"parallel_parts must be a number from 1 .* to 16"),
        ("parallel_parts = true", r"parallel_parts"),
        ('parallel_parts = "4"', r"parallel_parts"),
        ('parallel_min_size = "lots"', r"upstreams\.hub\.parallel_min_size: 'lots' is not a size"),
        ('parallel_min_size = "512KiB"', r"parallel_min_size must be at least 1MiB"),
        ("parallel_min_size = 1000", r"parallel_min_size"),
    ],
)
def test_bad_parallel_fetch_keys(tmp_path: Path, keys: str, message: str) -> None:
    text = f'[upstreams.hub]\nplugin = "dockerhub"\n{keys}\n'
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text))


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/mirror/",
        "https://example.com/mirror",
        "https://example.com/?x=1",
        "https://example.com/#top",
        "https://user:pw@example.com",
        "https://",
    ],
)
def test_a_public_url_is_the_root_of_a_host(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f'[server]\npublic_url = "{url}"\n')
    with pytest.raises(ConfigError, match="server.public_url must be the root of a host"):
        load(path)


@pytest.mark.parametrize(
    "url", ["https://mirror.example.com", "https://mirror.example.com/", "http://[::1]:5000"]
)
def test_a_public_url_at_the_root_of_a_host_is_fine(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f'[server]\npublic_url = "{url}"\n')
    assert load(path).server.public_url == url


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("url", '"http://[::1]:5000"'),
        ("mirrors", '["https://[2001:db8::1]"]\nurl = "https://r.example"'),
        ("token_realms", '["https://[::ffff:169.254.169.254]"]\nurl = "https://r.example"'),
    ],
)
def test_upstreams_at_ipv6_literals_are_refused(tmp_path: Path, key: str, value: str) -> None:
    """The HTTP client cannot reach them: every request would fail."""
    path = write(tmp_path, f"[upstreams.local]\nplugin = 'registry'\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=f"upstreams.local.{key}: .* names an IPv6 address"):
        load(path)


S3 = "[storage]\nbackend = 's3'\nbucket = 'mirror'\n"
CLUSTER = "[cluster]\ndatabase = 'postgresql://u@db/d'\nlisten = 'tcp:5001'\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cache]\nmax_size = '0'\n", "cache.max_size must be more than zero bytes"),
        ("[cache]\nmax_layer_size = '0GiB'\n", "cache.max_layer_size must be more than zero bytes"),
        ("[cache]\nmin_free = 'x'\n", "cache.min_free: 'x' is not a size"),
        (S3 + "max_size = '0'\n", "storage.max_size must be more than zero bytes"),
        (S3 + "max_size = 'lots'\n", "storage.max_size: 'lots' is not a size"),
        (
            S3 + "endpoint = 'https://s3.example.com/bucket'\n",
            'storage.endpoint must be an http(s) URL with no path, e.g. "https://s3.example.com"',
        ),
        (
            CLUSTER + "node_url = 'http://10.0.0.5:5001/node'\n",
            'cluster.node_url must be an http(s) URL with no path, e.g. "http://10.0.0.5:5001"',
        ),
        (CLUSTER + "node_url = 'ftp://10.0.0.5'\n", "cluster.node_url must be an http(s) URL"),
    ],
)
def test_sizes_and_base_urls_are_checked(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: {message}")


def test_a_zero_min_free_is_allowed(tmp_path: Path) -> None:
    config = load(write(tmp_path, "[cache]\nmin_free = '0'\nmax_size = '1GiB'\n"))
    assert (config.cache.min_free_bytes, config.cache.max_size_bytes) == (0, 1 << 30)
    assert config.cache.max_layer_size_bytes is None
