"""The [cache] section: where blobs and manifests are kept, and how much of them."""

from __future__ import annotations

from dataclasses import dataclass

from dockmirror.config.values import ConfigError, check_size, optional_size

OVERSIZE_POLICIES = ("passthrough", "reject")


@dataclass(frozen=True)
class CacheConfig:
    directory: str = "dockmirror-data/cache"
    #: The most the cache may hold on disk, as a size string; None: no quota.
    max_size: str | None = None
    #: The largest blob the cache will keep; None: no limit.
    max_layer_size: str | None = None
    #: What to do with a blob over max_layer_size: stream it uncached, or refuse it.
    oversize: str = "passthrough"
    #: Seconds a manifest fetched by tag is served before it is revalidated upstream.
    manifest_ttl: int = 3600
    #: Serve an expired manifest when the upstream is down, 5xx or 429.
    serve_stale: bool = True
    #: Free space to leave on the cache's file system, as a size string;
    #: None: the lesser of 256 MiB and 5 % of the file system.
    min_free: str | None = None
    #: The most tags remembered; beyond them the least recently used are dropped.
    max_tags: int = 100_000

    @property
    def min_free_bytes(self) -> int | None:
        return optional_size(self.min_free)

    @property
    def max_size_bytes(self) -> int | None:
        return optional_size(self.max_size)

    @property
    def max_layer_size_bytes(self) -> int | None:
        return optional_size(self.max_layer_size)


def check_cache(source: str, cache: CacheConfig) -> None:
    for key in ("max_size", "max_layer_size", "min_free"):
        text = getattr(cache, key)
        if text is None:
            continue
        check_size(f"{source}: cache.{key}", text, positive=key != "min_free")
    if cache.oversize not in OVERSIZE_POLICIES:
        raise ConfigError(
            f"{source}: cache.oversize must be one of {', '.join(map(repr, OVERSIZE_POLICIES))}"
            f", not {cache.oversize!r}"
        )
    if cache.manifest_ttl < 0:
        raise ConfigError(f"{source}: cache.manifest_ttl must be zero or more seconds")
    if cache.max_tags < 1:
        raise ConfigError(f"{source}: cache.max_tags must be at least 1")
