"""The [warm] section: images kept cached and fresh."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dockmirror.config.upstreams import UpstreamConfig, upstream_plugins
from dockmirror.config.values import ConfigError, parse_duration
from dockmirror.hostnames import HostPattern, parse_host
from dockmirror.reference import NAME_MAX, NAME_RE, TAG_RE

if TYPE_CHECKING:
    from dockmirror.config import Config


#: The most images a warm list may name.
WARM_IMAGES_MAX = 1000
_PLATFORM_RE = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")


@dataclass(frozen=True)
class WarmConfig:
    #: Images kept cached and fresh, as ``UPSTREAM/REPOSITORY:TAG``.
    images: tuple[str, ...] = ()
    #: Time between warm rounds, as a duration.
    interval: str = "6h"
    #: Platforms of multi-platform images to warm, as ``os/arch[/variant]``; empty: all.
    platforms: tuple[str, ...] = ()
    #: The share of ``cache.max_size`` that warm images keep from eviction.
    max_share: float = 0.5

    @property
    def interval_seconds(self) -> float:
        return parse_duration(self.interval)


@dataclass(frozen=True)
class WarmImage:
    """One image of the warm list: the upstream's configured name, a repository there, a tag.

    *alias* is the registry host the image was named by, when it was (``eu.gcr.io``).
    """

    upstream: str
    repository: str
    tag: str
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.alias or self.upstream}/{self.repository}:{self.tag}"


def _upstream_serving(host: str, upstreams: Mapping[str, UpstreamConfig]) -> tuple[str, str] | None:
    """The upstream whose aliases (its own, its plugin's) match the registry *host*, as routed."""
    name = parse_host(host)
    if name is None:
        return None
    plugins = upstream_plugins()
    for upstream, u in upstreams.items():
        plugin = plugins.get(u.plugin)
        patterns = (*(plugin.aliases if plugin is not None else ()), *u.aliases)
        if any(HostPattern.parse(p).matches(name) for p in patterns):
            return upstream, str(name)
    return None


def parse_warm_image(text: str, upstreams: Mapping[str, UpstreamConfig]) -> WarmImage:
    """``UPSTREAM/REPOSITORY:TAG``, with UPSTREAM the name of an ``[upstreams.NAME]`` table,
    or a registry host one of them serves, as clients name it (``eu.gcr.io``)."""
    names = sorted(upstreams)
    first, _, rest = text.partition("/")
    upstream, alias = first, None
    if first not in upstreams and "." in first:
        upstream, alias = _upstream_serving(first, upstreams) or (first, None)
    repository, colon, tag = rest.rpartition(":")
    if (
        upstream not in names
        or not colon
        or len(repository) > NAME_MAX
        or not NAME_RE.fullmatch(repository)
        or not TAG_RE.fullmatch(tag)
    ):
        raise ValueError(
            f"{text[:300]!r} is not UPSTREAM/REPOSITORY:TAG with UPSTREAM one of"
            f" {', '.join(names) or '(none configured)'}, or a registry host one of them"
            ' serves (e.g. "dockerhub/library/alpine:3", "eu.gcr.io/project/app:1")'
        )
    return WarmImage(upstream, repository, tag, alias)


def check_warm(config: Config) -> None:
    source, warm = config.source, config.warm
    if len(warm.images) > WARM_IMAGES_MAX:
        raise ConfigError(f"{source}: warm.images: at most {WARM_IMAGES_MAX} images")
    seen = set()
    for text in warm.images:
        try:
            image = parse_warm_image(text, config.upstreams)
        except ValueError as e:
            raise ConfigError(f"{source}: warm.images: {e}") from None
        if image in seen:
            raise ConfigError(f"{source}: warm.images: {text!r} is listed twice")
        seen.add(image)
    try:
        interval = warm.interval_seconds
    except ValueError as e:
        raise ConfigError(f"{source}: warm.interval: {e}") from None
    if interval < 1:
        raise ConfigError(f"{source}: warm.interval must be at least one second")
    for platform in warm.platforms:
        if not _PLATFORM_RE.fullmatch(platform):
            raise ConfigError(
                f"{source}: warm.platforms: {platform[:100]!r} is not OS/ARCHITECTURE[/VARIANT]"
                ' such as "linux/amd64" or "linux/arm/v7"'
            )
    if not 0 <= warm.max_share <= 1:
        raise ConfigError(f"{source}: warm.max_share must be between 0 and 1")
