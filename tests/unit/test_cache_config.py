"""The [cache] configuration keys."""

from __future__ import annotations

import pytest

from dockmirror.config import ConfigError, load, parse_size


@pytest.mark.parametrize(
    "text, size",
    [("500MB", 500_000_000), ("5GiB", 5 << 30), ("1.5 KiB", 1536), ("12", 12), ("3kb", 3000)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5 gigs", "", "GiB", "-1MB", "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def write(tmp_path, text):
    path = tmp_path / "dockmirror.toml"
    path.write_text(text)
    return str(path)


def test_cache_keys(tmp_path):
    config = load(
        write(
            tmp_path,
            """
            [cache]
            directory = "/var/cache/dockmirror"
            max_size = "500GiB"
            max_layer_size = "5GiB"
            oversize = "reject"
            manifest_ttl = 600
            serve_stale = false
            max_tags = 5000
            """,
        )
    )
    cache = config.cache
    assert (cache.max_size_bytes, cache.max_layer_size_bytes) == (500 << 30, 5 << 30)
    assert (cache.oversize, cache.manifest_ttl, cache.serve_stale) == ("reject", 600, False)
    assert cache.max_tags == 5000


def test_cache_defaults():
    cache = load(None).cache
    assert (cache.max_size_bytes, cache.max_layer_size_bytes) == (None, None)
    assert (cache.oversize, cache.manifest_ttl, cache.serve_stale) == ("passthrough", 3600, True)
    assert cache.max_tags == 100_000


@pytest.mark.parametrize(
    "line, message",
    [
        ('max_size = "lots"', "cache.max_size: 'lots' is not a size"),
        ('max_layer_size = "0MB"', "cache.max_layer_size must be more than zero"),
        ("max_size = 5", "cache.max_size must be a string"),
        ('oversize = "drop"', "cache.oversize must be one of 'passthrough', 'reject'"),
        ("manifest_ttl = -1", "cache.manifest_ttl must be zero or more"),
        ("max_tags = 0", "cache.max_tags must be at least 1"),
        ('max_tags = "many"', "cache.max_tags must be an integer"),
    ],
)
def test_cache_errors_name_the_key(tmp_path, line, message):
    path = write(tmp_path, f"[cache]\n{line}\n")
    with pytest.raises(ConfigError, match=message) as info:
        load(path)
    assert path in str(info.value)
