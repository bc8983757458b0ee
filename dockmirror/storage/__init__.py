"""Where blobs are kept by digest beyond the cache directory: ``[storage]``.

With ``backend = "filesystem"`` (the default) the cache directory is all
there is.  With ``backend = "s3"``, an S3-compatible bucket is a second
tier shared by every node (:mod:`dockmirror.storage.tier`), reached with
the client of :mod:`dockmirror.storage.s3`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dockmirror._interfaces import IBlobStorage
from dockmirror.config import StorageConfig
from dockmirror.metrics import Metrics
from dockmirror.storage.quota import Quota

if TYPE_CHECKING:  # the cache imports this package: no cycle when it is imported first
    from dockmirror.cache.index import Runner
    from dockmirror.storage.records import IndexRecords


def build_storage(
    config: StorageConfig, reactor: Any, run: Runner, records: IndexRecords, metrics: Metrics
) -> IBlobStorage | None:
    """The storage tier *config* asks for; None for the cache directory alone.

    Its quota is kept in this node's index, until a cluster puts its own records in.
    """
    if config.backend == "s3":
        from dockmirror.storage.tier import S3Storage  # botocore is an optional dependency

        quota = Quota(records, config.max_size_bytes, reactor)
        return S3Storage(config, reactor, run, quota, metrics)
    return None
