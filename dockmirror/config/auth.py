"""The [auth] section: who may pull, with which tokens."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dockmirror.config.values import ConfigError
from dockmirror.reference import NAME_RE

if TYPE_CHECKING:
    from dockmirror.config import Config


@dataclass(frozen=True)
class AuthConfig:
    required: bool = False
    database: str = "dockmirror-data/keys.sqlite"
    #: Lifetime of the bearer tokens /docker-auth/token issues, in seconds.
    token_ttl: int = 300
    #: Repositories served without login, as ``UPSTREAM/REPOSITORY-PREFIX``
    #: (matched on whole path components after routing, e.g. "dockerhub/library").
    anonymous_repos: tuple[str, ...] = ()


#: The longest token lifetime accepted: tokens cannot be recalled before they expire.
TOKEN_TTL_MAX = 3600


def check_auth(config: Config) -> None:
    source = config.source
    if not 1 <= config.auth.token_ttl <= TOKEN_TTL_MAX:
        raise ConfigError(f"{source}: auth.token_ttl must be between 1 and {TOKEN_TTL_MAX} seconds")
    for prefix in config.auth.anonymous_repos:
        try:
            check_repository_prefix(prefix, config.upstreams)
        except ValueError as e:
            raise ConfigError(f"{source}: auth.anonymous_repos: {e}") from None
    if config.manhole.listen is not None and config.manhole.authorized_keys is None:
        raise ConfigError(f"{source}: manhole.authorized_keys is required with manhole.listen")


def check_repository_prefix(prefix: str, upstreams: Iterable[str]) -> str:
    """Check an access-control prefix: ``UPSTREAM`` or ``UPSTREAM/REPOSITORY-PREFIX``.

    Prefixes name repositories as routed (the ``[upstreams.NAME]`` and the
    repository there), so that every spelling a client may use for the same
    repository (``alpine``, ``library/alpine``, ``docker.io/library/alpine``,
    a Host-routed name) is covered by one rule.
    """
    names = sorted(upstreams)
    upstream, slash, rest = prefix.partition("/")
    if upstream not in names or (slash and not NAME_RE.fullmatch(rest)):
        raise ValueError(
            f"{prefix!r} is not UPSTREAM/PREFIX with UPSTREAM one of"
            f' {", ".join(names) or "(none configured)"} (e.g. "dockerhub/library")'
        )
    return prefix
