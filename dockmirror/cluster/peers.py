"""Node-to-node requests: the cluster secret, and a client for other nodes' blobs.

A node asks another for a blob at ``<node_url>/_cluster/blobs/<digest>``
(see :mod:`dockmirror.cluster.listener`), with the cluster secret as a
bearer token, and reads the answer as it would an upstream's: streamed,
with backpressure, verified by its own fill.  The secret is the content of
``[cluster] secret_file``, or one made by the first node to start and kept
in PostgreSQL.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import psycopg
from twisted.internet.defer import TimeoutError
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from dockmirror.egress import _QuietClientFactory
from dockmirror.streaming import content_range_start
from dockmirror.upstream import discard

log = Logger()

#: The path of a blob on a node's cluster listener.
BLOB_PATH = "/_cluster/blobs/"
#: Seconds to connect to another node, and to get its answer's headers.
CONNECT_TIMEOUT = 3.0
HEADERS_TIMEOUT = 15.0
#: What a node URL from the database must look like before it is connected to.
NODE_URL_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]{1,300}")
#: The shortest secret a file may hold.
MIN_SECRET = 16


class SecretError(ValueError):
    """The cluster secret file cannot be used."""


def read_secret_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"cluster.secret_file {path}: {e}") from None
    if len(secret) < MIN_SECRET or not secret.isprintable():
        raise SecretError(
            f"cluster.secret_file {path}: the secret must be {MIN_SECRET} printable"
            " characters or more on one line"
        )
    return secret


def shared_secret(conn: psycopg.Connection[Any]) -> str:
    """The secret kept in the database, made by whichever node asks first."""
    conn.execute(
        "INSERT INTO cluster_secret (id, secret) VALUES (1, %s) ON CONFLICT (id) DO NOTHING",
        (secrets.token_urlsafe(32),),
    )
    row = conn.execute("SELECT secret FROM cluster_secret WHERE id = 1").fetchone()
    assert row is not None
    return str(row[0])


class PeerClient:
    """Opens other nodes' streams of a blob, authenticated with the cluster secret."""

    def __init__(self, reactor: Any, secret: str) -> None:
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool._factory = _QuietClientFactory
        self._pool.maxPersistentPerHost = 16
        self._agent = Agent(reactor, connectTimeout=CONNECT_TIMEOUT, pool=self._pool)
        self._reactor = reactor
        self._authorization = f"Bearer {secret}".encode()

    def __repr__(self) -> str:
        return "<PeerClient>"

    def close(self) -> Any:
        return self._pool.closeCachedConnections()

    async def open(self, node: str, digest: str, size: int, offset: int) -> IResponse | None:
        """*node*'s stream of the blob from *offset* (a 200 from 0 will do); None if it has none."""
        if not NODE_URL_RE.fullmatch(node):
            log.warn("ignoring the malformed node URL {node!r}", node=node[:100])
            return None
        headers = Headers({b"authorization": [self._authorization]})
        if offset:
            headers.addRawHeader(b"range", f"bytes={offset}-".encode())
        url = f"{node}{BLOB_PATH}{digest}".encode()
        d = self._agent.request(b"GET", url, headers)
        d.addTimeout(HEADERS_TIMEOUT, self._reactor)
        try:
            response: IResponse = await d
        except (
            ConnectError,
            ResponseFailed,
            ResponseNeverReceived,
            RequestTransmissionFailed,
            TimeoutError,
            OSError,
        ) as e:
            log.info(
                "node {node} cannot stream {digest}: {error}", node=node, digest=digest, error=e
            )
            return None
        if response.code == 200 and response.length == size:
            return response
        if (
            response.code == 206
            and response.length == size - offset
            and content_range_start(response, size) == offset
        ):
            return response
        log.info(
            "node {node} answered {code} for {digest}", node=node, code=response.code, digest=digest
        )
        discard(response)
        return None
