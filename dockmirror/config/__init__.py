"""The TOML configuration: its schema, defaults and validation.

Each section is a dataclass whose fields are the user-facing keys; the loader
checks names and types against those fields, so an unknown key or a wrong type
is refused with a message naming the key and the file.  Each section, its
dataclass and its checks, is a module of this package; :func:`load` reads a
file into a :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockmirror.config.auth import TOKEN_TTL_MAX, AuthConfig, check_auth, check_repository_prefix
from dockmirror.config.cache import OVERSIZE_POLICIES, CacheConfig, check_cache
from dockmirror.config.cluster import (
    CLUSTER_MODULES,
    ClusterConfig,
    check_cluster,
    check_database_url,
)
from dockmirror.config.server import (
    HEADER_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_CLIENT,
    MAX_WORKERS,
    SEND_TIMEOUT,
    ManholeConfig,
    MetricsConfig,
    ServerConfig,
    check_server,
)
from dockmirror.config.storage import (
    S3_ADDRESSING,
    STORAGE_BACKENDS,
    StorageConfig,
    check_bucket,
    check_storage,
    is_aws_endpoint,
    storage_egress,
)
from dockmirror.config.upstreams import (
    PARALLEL_MIN_SIZE_MIN,
    PARALLEL_PARTS_MAX,
    READ_TIMEOUT,
    MirrorConfig,
    UpstreamConfig,
    check_upstreams,
    upstream_plugins,
    upstream_proxies,
    upstream_tls,
)
from dockmirror.config.values import (
    SECRET,
    SECRET_URL,
    TIMEOUT_MAX,
    ConfigError,
    parse_duration,
    parse_size,
    redacted_repr,
)
from dockmirror.config.warm import (
    WARM_IMAGES_MAX,
    WarmConfig,
    WarmImage,
    check_warm,
    parse_warm_image,
)
from dockmirror.egress import CONNECT_TIMEOUT
from dockmirror.portal import config as portal_config
from dockmirror.portal.config import PortalConfig

#: The public names of the configuration, wherever in the package they are defined.
__all__ = [
    "AuthConfig",
    "CLUSTER_MODULES",
    "CONNECT_TIMEOUT",
    "CacheConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "EMBEDDED",
    "HEADER_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_CLIENT",
    "MAX_WORKERS",
    "ManholeConfig",
    "MetricsConfig",
    "MirrorConfig",
    "OVERSIZE_POLICIES",
    "PARALLEL_MIN_SIZE_MIN",
    "PARALLEL_PARTS_MAX",
    "PortalConfig",
    "READ_TIMEOUT",
    "S3_ADDRESSING",
    "SECRET",
    "SECRET_URL",
    "SEND_TIMEOUT",
    "STORAGE_BACKENDS",
    "ServerConfig",
    "StorageConfig",
    "TIMEOUT_MAX",
    "TOKEN_TTL_MAX",
    "UpstreamConfig",
    "WARM_IMAGES_MAX",
    "WarmConfig",
    "WarmImage",
    "check_bucket",
    "check_database_url",
    "check_repository_prefix",
    "config_warnings",
    "is_aws_endpoint",
    "listeners",
    "load",
    "parse_duration",
    "parse_size",
    "parse_warm_image",
    "redacted_repr",
    "state_directory",
    "storage_egress",
    "upstream_plugins",
    "upstream_proxies",
    "upstream_tls",
]

EMBEDDED = "(embedded default)"


@dataclass(frozen=True)
class Config:
    source: str = EMBEDDED
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    manhole: ManholeConfig = field(default_factory=ManholeConfig)
    portal: PortalConfig = field(default_factory=PortalConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    warm: WarmConfig = field(default_factory=WarmConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def warm_images(self) -> list[WarmImage]:
        """The warm list, parsed (it was checked at load)."""
        return [parse_warm_image(image, self.upstreams) for image in self.warm.images]


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "cache": CacheConfig,
    "metrics": MetricsConfig,
    "manhole": ManholeConfig,
    "portal": PortalConfig,
    "warm": WarmConfig,
    "storage": StorageConfig,
    "cluster": ClusterConfig,
}


def load(path: str | None) -> Config:
    """Read and validate *path*; None gives the embedded default."""
    if path is None:
        return _build(
            EMBEDDED,
            {
                "upstreams": {
                    "dockerhub": {"plugin": "dockerhub", "default": True},
                    "ghcr": {"plugin": "ghcr"},
                    "quay": {"plugin": "quay"},
                    "gcr": {"plugin": "gcr"},
                    "k8s": {"plugin": "k8s"},
                }
            },
        )
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return _build(path, data)


def _build(source: str, data: dict[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            sections[key] = _section(source, key, _SECTIONS[key], value)
        elif key != "upstreams":
            raise ConfigError(f"{source}: unknown section [{key}]")
    upstreams_table = data.get("upstreams", {})
    if not isinstance(upstreams_table, dict):
        raise ConfigError(f"{source}: [upstreams] must be a table of [upstreams.NAME]")
    upstreams = {
        name: _section(source, f"upstreams.{name}", UpstreamConfig, table)
        for name, table in upstreams_table.items()
    }
    config = Config(source=source, upstreams=upstreams, **sections)
    _check(config)
    return config


def _section(source: str, where: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key {where}.{key} (known: {', '.join(sorted(names))})"
            )
        values[key] = _coerce(source, f"{where}.{key}", hints[key], value)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if required:
        raise ConfigError(f"{source}: missing key {where}.{required[0]}")
    return cls(**values)


def _coerce(source: str, key: str, hint: Any, value: Any) -> Any:
    """Check *value* against a field's type hint; lists become tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        for alternative in inner[1:]:
            if isinstance(value, alternative) and not isinstance(value, bool):
                return value
        return _coerce(source, key, inner[0], value)
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        cls = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list")
        for i, v in enumerate(value):
            if not isinstance(v, str | dict):
                raise ConfigError(f"{source}: {key}[{i}] must be a URL or a table")
        return tuple(
            cls(url=v) if isinstance(v, str) else _section(source, f"{key}[{i}]", cls, v)
            for i, v in enumerate(value)
        )
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _section(source, key, hint, value)
    if origin is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{source}: {key} must be a list of strings")
    expected = {bool: "a boolean", int: "an integer", str: "a string", float: "a number"}
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{source}: {key} must be {expected.get(hint, hint.__name__)}")
    return value


def _check(config: Config) -> None:
    """Checks that span keys."""
    source = config.source
    if not config.server.listen:
        raise ConfigError(f"{source}: server.listen must name at least one endpoint")
    check_upstreams(source, config.upstreams)
    check_server(source, config.server, config.metrics)
    check_cache(source, config.cache)
    check_storage(source, config.storage)
    check_cluster(source, config.cluster)
    check_auth(config)
    try:
        portal_config.check(config.portal)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    check_warm(config)


def config_warnings(config: Config) -> list[str]:
    """What is allowed but probably a mistake, to log at start and print at ``--check``."""
    found = []
    known = upstream_plugins()
    for name, upstream in config.upstreams.items():
        url = upstream.url or known[upstream.plugin].default_url
        if upstream.username is not None and str(url).startswith("http://"):
            found.append(
                f"upstreams.{name}: credentials go to {url} over plain HTTP,"
                " readable by anyone on the path"
            )
        for i, mirror in enumerate(upstream.mirrors):
            if mirror.username is not None and mirror.url.startswith("http://"):
                found.append(
                    f"upstreams.{name}.mirrors[{i}]: credentials go to {mirror.url} over"
                    " plain HTTP, readable by anyone on the path"
                )
    return found


def listeners(config: Config) -> list[tuple[str, tuple[str, ...]]]:
    """Every endpoint string of the configuration, with its key, in the workers' order."""
    manhole = (config.manhole.listen,) if config.manhole.listen is not None else ()
    return [
        ("server.listen", config.server.listen),
        ("metrics.listen", config.metrics.listen),
        ("manhole.listen", manhole),
        ("cluster.listen", (config.cluster.listen,) if config.cluster.listen else ()),
    ]


def state_directory(config: Config) -> Path:
    """Where keys, signing keys and the SSH host key are kept."""
    return Path(config.auth.database).parent
