"""Property-based tests of every parser of client, upstream and operator input.

Each parser either returns a value that satisfies its grammar or raises its
documented error type (RegistryError for requests, ConfigError for the
configuration); nothing else escapes, whatever the input.
"""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dockmirror import config as config_module
from dockmirror.auth.access import Credentials, parse_authorization
from dockmirror.auth.tokens import MAX_SCOPES, requested_repositories
from dockmirror.cache.manifests import manifest_media_type, references
from dockmirror.cache.referrers import referrers_list
from dockmirror.config import ConfigError, parse_size
from dockmirror.errors import RegistryError
from dockmirror.pull.access import first_error_code
from dockmirror.pull.ranges import parse_range
from dockmirror.reference import (
    HEX_LENGTH,
    NAME_MAX,
    NAME_RE,
    TAG_RE,
    V2Path,
    check_digest,
    check_name,
    check_reference,
    parse_image_reference,
    parse_v2_path,
)
from dockmirror.upstream import Challenge, parse_www_authenticate

settings.register_profile(
    "dockmirror", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("dockmirror")

#: Text as it arrives: any code point, with the characters the grammars care about often.
SPECIAL = "/:@._-+=%,; \t\"'\\\x00\r\n" + "aZ09" + "\u00b2\u0661\uff10\u212a"
texts = st.text(st.characters() | st.sampled_from(SPECIAL), max_size=300)
_alnum = st.text("abcxyz0189", min_size=1, max_size=6)
_separators = st.sampled_from([".", "_", "__", "-", "---"])
components = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    _alnum,
    st.lists(st.tuples(_separators, _alnum), max_size=2),
)
names = st.lists(components, min_size=1, max_size=6).map("/".join)
tags = st.from_regex(TAG_RE, fullmatch=True)
digests = st.binary(max_size=64).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())


def _refused(call: Any, *args: Any) -> RegistryError | None:
    """The RegistryError ``call(*args)`` raises, or None if it returns."""
    try:
        call(*args)
    except RegistryError as e:
        assert 400 <= e.status < 500
        return e
    return None


# --- names, tags, digests, paths --------------------------------------------


@given(texts | names)
@example("a" * 256)
@example("a/../b")
@example("ａ")
def test_check_name_accepts_the_grammar_only(text: str) -> None:
    if _refused(check_name, text) is None:
        assert len(text) <= NAME_MAX and NAME_RE.fullmatch(text)
        assert text.isascii() and ".." not in text.split("/") and "" not in text.split("/")


@given(names)
def test_every_name_of_the_grammar_is_accepted(name: str) -> None:
    if len(name) <= NAME_MAX:
        assert check_name(name) == name


@given(texts | tags | digests)
@example("sha256:" + "A" * 64)
@example("sha256:" + "٠" * 64)
@example("SHA256:" + "0" * 64)
def test_check_reference(text: str) -> None:
    error = _refused(check_reference, text)
    if error is None and ":" in text:
        algorithm, _, hexpart = text.partition(":")
        assert re.fullmatch(r"[0-9a-f]+", hexpart) and len(hexpart) == HEX_LENGTH[algorithm]
    elif error is None:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", text, re.ASCII)


@given(digests)
def test_real_digests_are_accepted(digest: str) -> None:
    assert check_digest(digest) == digest


@given(st.lists(texts | names | st.sampled_from(["manifests", "blobs", "tags", "list"])))
def test_parse_v2_path(segments: list[str]) -> None:
    try:
        path = parse_v2_path(list(segments))
    except RegistryError as e:
        assert e.status in (400, 404)
        return
    assert isinstance(path, V2Path)
    if path.kind in ("manifests", "blobs", "tags"):
        assert check_name(path.name) == path.name


@given(texts | st.tuples(names, tags).map(":".join) | st.tuples(names, digests).map("@".join))
def test_parse_image_reference(text: str) -> None:
    try:
        image = parse_image_reference(text)
    except RegistryError:
        return
    assert check_name(image.name) == image.name
    assert check_reference(image.reference) == image.reference


# --- Range -------------------------------------------------------------------

_STRICT_RANGE = re.compile(r"bytes=[ \t]*(?:[0-9]+-[0-9]*|-[0-9]+)[ \t]*", re.IGNORECASE)


@given(
    st.none() | texts | st.from_regex(r"bytes=[0-9 ]{0,25}-[0-9 ]{0,25}", fullmatch=True),
    st.integers(min_value=0, max_value=1 << 45),
)
@example("bytes=1_0-20", 100)
@example("bytes=١-٢", 100)
@example("bytes= 1-2", 100)
@example("bytes=+1-2", 100)
@example("bytes=" + "9" * 5000 + "-", 100)
def test_parse_range(header: str | None, size: int) -> None:
    try:
        span = parse_range(header, size)
    except RegistryError as e:
        assert e.status == 416 and e.headers == {"Content-Range": f"bytes */{size}"}
        assert header is not None and _STRICT_RANGE.fullmatch(header)
        return
    if span is not None:
        assert header is not None and _STRICT_RANGE.fullmatch(header), header
        start, end = span
        assert 0 <= start < end <= size


# --- WWW-Authenticate ------------------------------------------------------------

token_chars = st.text(
    "!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-"
)
auth_tokens = token_chars.filter(bool)
param_values = st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(st.lists(texts, max_size=4))
@example(['Bearer realm="x", , ,scope=', "\\"])
def test_www_authenticate_never_raises(values: list[str]) -> None:
    for challenge in parse_www_authenticate(values):
        assert isinstance(challenge, Challenge)
        assert challenge.scheme == challenge.scheme.lower()


@given(
    st.lists(
        st.tuples(
            auth_tokens,
            st.dictionaries(auth_tokens.map(str.lower), param_values, min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_www_authenticate_round_trip(challenges: list[tuple[str, dict[str, str]]]) -> None:
    value = ", ".join(
        f"{scheme} " + ", ".join(f"{k}={_quoted(v)}" for k, v in params.items())
        for scheme, params in challenges
    )
    assert parse_www_authenticate([value]) == [
        Challenge(scheme.lower(), params) for scheme, params in challenges
    ]


# --- Authorization and scope -----------------------------------------------------


@given(
    st.none()
    | texts
    | st.tuples(st.sampled_from(["Basic ", "Bearer ", " bAsIc  "]), texts).map("".join)
)
@example("Basic \x98")
@example("Basic " + base64.b64encode(b"\xff\xfe:x").decode())
@example("Basic " + "A" * 10001)
def test_parse_authorization_never_raises(header: str | None) -> None:
    credentials = parse_authorization(header)
    assert credentials is None or credentials.scheme in ("basic", "bearer")


@given(
    st.text(st.characters(exclude_characters=":", exclude_categories=["Cs"])),
    st.text(st.characters(exclude_categories=["Cs"])),
)
def test_basic_round_trip(username: str, password: str) -> None:
    pair = base64.b64encode(f"{username}:{password}".encode()).decode()
    assert parse_authorization(f"Basic {pair}") == Credentials("basic", username, password)


@given(
    st.lists(
        texts
        | st.tuples(names, st.sampled_from(["pull", "push,pull", "*"])).map(
            lambda t: f"repository:{t[0]}:{t[1]}"
        ),
        max_size=100,
    )
)
def test_requested_repositories(scopes: list[str]) -> None:
    granted = requested_repositories(scopes)
    assert len(granted) <= MAX_SCOPES and len(set(granted)) == len(granted)
    for name in granted:
        assert check_name(name) == name


# --- the configuration ---------------------------------------------------------------

FIELDS = {
    section: [f.name for f in config_module.dataclasses.fields(cls)]
    for section, cls in config_module._SECTIONS.items()
}
UPSTREAM_FIELDS = [f.name for f in config_module.dataclasses.fields(config_module.UpstreamConfig)]
sizes = st.from_regex(
    r"\s*[0-9٠-٩]{1,400}(\.[0-9]{1,3})?\s*(B|kB|MiB|GiB|TB|xB)?\s*", fullmatch=True
)
values = st.recursive(
    st.none().map(lambda _: "")
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False)
    | texts
    | sizes
    | st.sampled_from(
        [
            "tcp:5000",
            "ssl:443:privateKey=/nonexistent",
            "http://[::1",
            "http://[",
            "https://127.0.0.1:1",
            "dockerhub",
            "registry",
            "10.0.0.0/8",
            "dockerhub/library",
            "hub/x/../y",
        ]
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


def _table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys) | texts, values, max_size=len(keys) + 1)


configs = st.fixed_dictionaries(
    {},
    optional={
        **{section: _table(keys) | values for section, keys in FIELDS.items()},
        "upstreams": st.dictionaries(
            st.sampled_from(["hub", "ghcr", "Bad Name", ""]) | texts,
            _table(UPSTREAM_FIELDS) | values,
            max_size=3,
        )
        | values,
    },
) | st.dictionaries(texts, values, max_size=2)


@settings(max_examples=500)
@given(configs)
@example({"cache": {"max_size": "9" * 400}})
@example({"cache": {"max_layer_size": "1" + "0" * 330 + "TB"}})
@example({"server": {"public_url": "http://["}})
@example({"upstreams": {"hub": {"plugin": "registry", "url": "http://["}}})
@example({"upstreams": {"hub": {"plugin": "registry", "url": "http://h:99999"}}})
@example({"upstreams": {"hub": {"plugin": "registry", "url": "http://h:x/"}}})
@example({"upstreams": {"hub": {"plugin": "dockerhub", "token_realms": ["https://["]}}})
def test_config_builds_or_says_why(data: dict[str, Any]) -> None:
    try:
        config = config_module._build("fuzz.toml", data)
    except ConfigError as e:
        assert str(e).startswith("fuzz.toml: ")
        return
    for text in (config.cache.max_size, config.cache.max_layer_size):
        if text is not None:
            assert parse_size(text) > 0


@given(st.binary(max_size=2000) | texts.map(lambda t: t.encode("utf-8", "surrogatepass")))
@example(b'[cache]\nmax_size = "' + b"9" * 400 + b'"\n')
def test_config_file_loads_or_says_why(tmp_path_factory: Any, data: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("config")) / "dockmirror.toml"
    path.write_bytes(data)
    try:
        config_module.load(str(path))
    except ConfigError as e:
        assert str(e).startswith(f"{path}: ")


@given(sizes | texts)
def test_parse_size(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert isinstance(size, int) and size >= 0
    assert re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*[A-Za-z]*\s*", text, re.ASCII)


def test_toml_of_the_shipped_file_builds() -> None:
    shipped = Path(__file__).resolve().parents[2] / "etc" / "dockmirror.toml"
    data = tomllib.loads(shipped.read_text())
    assert config_module._build("shipped", data).upstreams


# --- JSON from upstreams --------------------------------------------------------------

_DEEP = b"[" * 100_000 + b"]" * 100_000


def test_json_nested_too_deeply_is_not_json_to_every_parser():
    oci_index = "application/vnd.oci.image.index.v1+json"
    assert manifest_media_type(_DEEP, "application/vnd.oci.image.manifest.v1+json") is None
    assert references(_DEEP) == []
    assert referrers_list(_DEEP, oci_index) is None
    assert first_error_code(_DEEP) is None
