"""The [cluster] section: nodes sharing PostgreSQL, and how they reach one another."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from dockmirror.config.values import (
    SECRET_URL,
    ConfigError,
    check_root_url,
    redacted_repr,
    url_parts,
)


@dataclass(frozen=True)
class ClusterConfig:
    """Several nodes sharing one key store, index and fill coordination in PostgreSQL."""

    #: ``postgresql://user:password@host:port/dbname``; None: one node, SQLite.
    database: str | None = field(default=None, metadata=SECRET_URL)
    #: Endpoint string for node-to-node traffic (fills streamed between nodes).
    listen: str | None = None
    #: How the other nodes reach this one's ``listen``, e.g. ``http://10.0.0.5:5001``.
    node_url: str | None = None
    #: A file holding the secret that node-to-node requests carry; None: kept in PostgreSQL.
    secret_file: str | None = None
    #: Connections each process (each worker) may open for its queries.
    pool_size: int = 8
    #: Seconds the cache's shared parts go without asking PostgreSQL after it failed.
    backoff: float = 5.0

    __repr__ = redacted_repr


#: The most PostgreSQL connections of one process's pool (``[cluster] pool_size``).
MAX_POOL_SIZE = 64
#: The longest ``[cluster] backoff``, in seconds.
MAX_BACKOFF = 300.0
#: What ``pip install 'dockmirror[cluster]'`` brings that a cluster database needs.
CLUSTER_MODULES = ("psycopg", "psycopg_pool")


def _missing_module(names: tuple[str, ...]) -> str | None:
    """The first of *names* that cannot be imported, or None."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def check_database_url(where: str, url: str) -> None:
    """Check a cluster database URL, and that the cluster extra is there to use it."""
    parts = url_parts(url)
    if parts is None or parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"{where} must be a postgresql:// URL (postgresql://user:password@host:5432/dockmirror)"
        )
    missing = _missing_module(CLUSTER_MODULES)
    if missing is not None:
        raise ConfigError(
            f"{where} needs the cluster extra, which is not installed"
            f" (no module {missing}): pip install 'dockmirror[cluster]'"
        )


def check_cluster(source: str, cluster: ClusterConfig) -> None:
    if not 1 <= cluster.pool_size <= MAX_POOL_SIZE:
        raise ConfigError(f"{source}: cluster.pool_size must be a number from 1 to {MAX_POOL_SIZE}")
    if not 0 < cluster.backoff <= MAX_BACKOFF:
        raise ConfigError(
            f"{source}: cluster.backoff must be more than 0 and at most {MAX_BACKOFF:.0f} seconds"
        )
    if cluster.database is not None:
        check_database_url(f"{source}: cluster.database", cluster.database)
    elif cluster.listen is not None or cluster.node_url is not None:
        raise ConfigError(f"{source}: cluster.listen and cluster.node_url need cluster.database")
    if (cluster.listen is None) != (cluster.node_url is None):
        raise ConfigError(f"{source}: cluster.listen and cluster.node_url go together")
    if cluster.node_url is not None:
        check_root_url(f"{source}: cluster.node_url", cluster.node_url, "http://10.0.0.5:5001")
