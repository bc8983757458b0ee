"""The ``[warm]`` section: images, interval, platforms and max_share."""

from __future__ import annotations

from typing import Any

import pytest

from dockmirror.config import ConfigError, WarmImage, _build, parse_duration

UPSTREAMS = {"dockerhub": {"plugin": "dockerhub"}, "ghcr": {"plugin": "ghcr"}}


def build(**warm: Any) -> Any:
    return _build("test.toml", {"upstreams": UPSTREAMS, "warm": warm})


def test_defaults_and_a_full_section() -> None:
    config = build()
    assert (config.warm.images, config.warm.interval_seconds) == ((), 6 * 3600)
    assert (config.warm.platforms, config.warm.max_share) == ((), 0.5)
    config = build(
        images=["dockerhub/library/alpine:3", "ghcr/owner/img:1.2"],
        interval="1h30m",
        platforms=["linux/amd64", "linux/arm/v7"],
        max_share=1,
    )
    assert config.warm_images() == [
        WarmImage("dockerhub", "library/alpine", "3"),
        WarmImage("ghcr", "owner/img", "1.2"),
    ]
    assert (config.warm.interval_seconds, config.warm.max_share) == (5400, 1.0)


@pytest.mark.parametrize(
    "text, seconds",
    [("6h", 21600), ("1h30m", 5400), ("90s", 90), ("600", 600), ("1.5d", 129600), (" 2m ", 120)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "warm, message",
    [
        ({"images": ["quay/x:1"]}, "UPSTREAM/REPOSITORY:TAG with UPSTREAM one of dockerhub, ghcr"),
        ({"images": ["dockerhub/library/alpine"]}, "is not UPSTREAM/REPOSITORY:TAG"),
        ({"images": ["dockerhub/Library/alpine:3"]}, "is not UPSTREAM/REPOSITORY:TAG"),
        ({"images": ["dockerhub/../etc:3"]}, "is not UPSTREAM/REPOSITORY:TAG"),
        ({"images": ["dockerhub/alpine:-3"]}, "is not UPSTREAM/REPOSITORY:TAG"),
        ({"images": ["dockerhub/alpine@sha256:" + "a" * 64]}, "is not UPSTREAM/REPOSITORY:TAG"),
        ({"images": ["dockerhub/a:1", "dockerhub/a:1"]}, "is listed twice"),
        ({"images": [f"dockerhub/a:{i}" for i in range(1001)]}, "at most 1000 images"),
        ({"interval": "6 hours"}, "warm.interval: '6 hours' is not a duration"),
        ({"interval": "0s"}, "at least one second"),
        ({"interval": 6}, "warm.interval must be a string"),
        ({"platforms": ["linux"]}, "is not OS/ARCHITECTURE[/VARIANT]"),
        ({"platforms": ["linux/amd64/v1/x"]}, "is not OS/ARCHITECTURE[/VARIANT]"),
        ({"max_share": 1.5}, "between 0 and 1"),
        ({"max_share": -0.1}, "between 0 and 1"),
        ({"size": 1}, "unknown key warm.size"),
    ],
)
def test_bad_warm_sections_are_refused(warm: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(**warm)
    assert message in str(info.value)
    assert str(info.value).startswith("test.toml: ")
