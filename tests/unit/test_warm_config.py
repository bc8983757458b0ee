"""The ``[warm]`` section: images, interval, platforms and max_share."""

from __future__ import annotations

from typing import Any

import pytest

from dockmirror.cache import origin_of
from dockmirror.config import ConfigError, WarmImage, _build, parse_duration, upstream_plugins
from dockmirror.routing import build_router

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


def test_an_image_may_name_the_registry_host_an_upstream_serves() -> None:
    """gcr's regional hosts are registries of their own, reached through one upstream."""
    config = _build(
        "test.toml",
        {
            "upstreams": {"dockerhub": {"plugin": "dockerhub"}, "gcr": {"plugin": "gcr"}},
            "warm": {
                "images": [
                    "eu.gcr.io/project/app:1",
                    "gcr/project/app:1",
                    "asia.gcr.io/project/app:1",
                    "US.gcr.io/project/app:2",
                ]
            },
        },
    )
    images = config.warm_images()
    assert images == [
        WarmImage("gcr", "project/app", "1", "eu.gcr.io"),
        WarmImage("gcr", "project/app", "1"),
        WarmImage("gcr", "project/app", "1", "asia.gcr.io"),
        WarmImage("gcr", "project/app", "2", "us.gcr.io"),
    ]
    assert str(images[0]) == "eu.gcr.io/project/app:1"
    router = build_router(config, upstream_plugins())
    for image in (images[0], images[2], images[3]):
        warmed = router.route_to(image.upstream, image.repository, image.alias)
        pulled = router.route(str(image).rpartition(":")[0])  # as a client names it
        assert origin_of(warmed) == origin_of(pulled)
    assert router.route_to("gcr", "project/app", "eu.gcr.io").base_url == "https://eu.gcr.io"


@pytest.mark.parametrize(
    "image", ["evil.example.com/project/app:1", "eu.gcr.io./project/app:1", "eu..gcr.io/x:1"]
)
def test_a_host_no_upstream_serves_is_refused(image: str) -> None:
    with pytest.raises(ConfigError, match="is not UPSTREAM/REPOSITORY:TAG"):
        _build("test.toml", {"upstreams": {"gcr": {"plugin": "gcr"}}, "warm": {"images": [image]}})
