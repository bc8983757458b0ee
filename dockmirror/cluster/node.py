"""This node's part in the cluster's cache: shared fill claims, the shared index, the listener,
and the storage bucket's records.

Started after the cache has recovered from its disk: it creates the tables
of ``cache.sql`` (once, whichever node starts first), gets the cluster
secret, puts a :class:`~dockmirror.cluster.coordinator.ClusterCoordinator`
over the cache's own coordinator and records what this node holds.  Like
the cache's recovery, this blocks, before the mirror listens.
"""

from __future__ import annotations

from functools import partial
from importlib import resources
from typing import Any

import psycopg
from twisted.application import service
from twisted.logger import Logger

from dockmirror.cache import Cache
from dockmirror.cluster.coordinator import ClusterCoordinator, FlightClaims, Session
from dockmirror.cluster.database import Database, DatabaseUnavailable
from dockmirror.cluster.index import ClusterIndex
from dockmirror.cluster.peers import PeerClient, read_secret_file, shared_secret
from dockmirror.cluster.storage import ClusterRecords
from dockmirror.config import ClusterConfig

log = Logger()


class ClusterNode(service.MultiService):
    """One node of the cluster, as far as the cache is concerned."""

    name = "cluster"

    def __init__(
        self, config: ClusterConfig, cache: Cache, database: Database, reactor: Any
    ) -> None:
        """*database* is the process's pool, started before this service."""
        super().__init__()
        assert config.database is not None and config.node_url is not None
        self._config = config
        self._cache = cache
        self._reactor = reactor
        self.node_url = config.node_url.rstrip("/")
        self.database = database
        self.session = Session(config.database, reactor)
        self.index = ClusterIndex(
            cache, self.database, self.session, self.node_url, reactor, backoff=config.backoff
        )
        #: The storage bucket's records, if the cache has a storage tier: the cluster's.
        self.records: ClusterRecords | None = None
        if cache.storage is not None:
            self.records = ClusterRecords(
                self.session,
                self.node_url,
                reactor,
                cache.storage.records.max_size,
                backoff=config.backoff,
            )
            cache.storage.records = self.records
            self.records.setServiceParent(self)
        #: The secret node-to-node requests carry; known once started.
        self.secret: str | None = None
        if config.secret_file is not None:
            self.secret = read_secret_file(config.secret_file)
        self.peers: PeerClient | None = None

    def __repr__(self) -> str:
        return f"<ClusterNode {self.node_url}>"

    def startService(self) -> None:
        schemas = ["cache.sql"] + (["storage.sql"] if self.records is not None else [])
        for schema in schemas:
            self.database.migrate(
                resources.files("dockmirror.cluster").joinpath(schema).read_text()
            )
        if self.secret is None:
            self.secret = self.database.call(shared_secret)
        self.peers = PeerClient(self._reactor, self.secret)
        self.index.peers = self.peers
        self.session.start()
        blobs = self._cache.blobs
        backoff = self._config.backoff
        blobs.coordinator = ClusterCoordinator(
            blobs.coordinator, self.session, self.node_url, self.peers, self._reactor, backoff
        )
        self._cache.flights.cluster = FlightClaims(self.session, self._reactor, backoff)
        self.index.setServiceParent(self)
        log.info("cache shared with the cluster as node {node}", node=self.node_url)
        super().startService()

    async def filling_size(self, digest: str) -> int | None:
        """The size of *digest* as announced by the process of this node that fills it.

        None if no process of this node fills it, or PostgreSQL cannot tell now.
        """
        try:
            row = await self.database.run(partial(_fill_of, digest, self.node_url))
        except DatabaseUnavailable:
            return None
        return None if row is None else int(row[0])

    def stopService(self) -> Any:
        d = super().stopService()

        def stopped(result: object) -> object:
            self.session.stop()
            return self.peers.close() if self.peers is not None else result

        return d.addBoth(stopped)


def _fill_of(digest: str, node_url: str, conn: psycopg.Connection[Any]) -> Any:
    return conn.execute(
        "SELECT size FROM fills WHERE digest = %s AND node_url = %s", (digest, node_url)
    ).fetchone()
