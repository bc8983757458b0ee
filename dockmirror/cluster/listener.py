"""The cluster listener: this node's blobs, for the other nodes only.

``GET /_cluster/blobs/<digest>`` (and ``HEAD``) with the cluster secret as
a bearer token answers a blob this node is filling, from its temporary
file as it grows, or one it holds.  A fill in progress is streamed like it
is to this node's own clients: at the reader's pace, with the last byte
held back until the fill is verified, and the connection cut if it fails,
so the other node never takes a partial blob for a whole one.  The
listener's socket is shared by the node's workers like the public ones, so
the worker a request lands on may not be the one filling: it follows that
worker's temporary file, as that worker's own clients do
(:mod:`dockmirror.cache.follow`).  Only
``Range: bytes=N-`` is honoured, which is how a node resumes a broken
stream.  Every other request is refused with a registry-format error.
"""

from __future__ import annotations

import hmac
import re

from twisted.logger import Logger
from twisted.web.server import Request

from dockmirror.cache.blobs import BlobStore
from dockmirror.cache.fill import Fill
from dockmirror.cache.follow import FollowedFill
from dockmirror.cluster.node import ClusterNode
from dockmirror.cluster.peers import BLOB_PATH
from dockmirror.errors import RegistryError
from dockmirror.pull.access import Reply
from dockmirror.streaming import StreamError
from dockmirror.web import AsyncResource, send_reply

log = Logger()

_PATH_RE = re.compile(
    re.escape(BLOB_PATH).encode() + rb"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})"
)
_RANGE_RE = re.compile(rb"bytes=(\d{1,19})-")


def _ignore(_: int) -> None:
    pass


class ClusterResource(AsyncResource):
    """The root of the cluster listener."""

    def __init__(self, store: BlobStore, node: ClusterNode) -> None:
        super().__init__()
        self._store = store
        self._node = node

    def __repr__(self) -> str:
        return "<ClusterResource>"

    async def serve(self, request: Request) -> None:
        if self._node.secret is None:
            raise RegistryError("UNAVAILABLE", "the node is starting", status=503)
        given = request.getHeader(b"authorization") or b""
        if not hmac.compare_digest(given, f"Bearer {self._node.secret}".encode()):
            raise RegistryError(
                "UNAUTHORIZED", "this listener serves the other nodes of the cluster only"
            )
        if request.method not in (b"GET", b"HEAD"):
            raise RegistryError("UNSUPPORTED", "only GET and HEAD", status=405)
        match = _PATH_RE.fullmatch(request.path)
        if match is None or request.args:
            raise RegistryError("NAME_UNKNOWN", "no such path", status=404)
        digest = match[1].decode()
        await send_reply(request, await self._reply(digest, request))

    async def _reply(self, digest: str, request: Request) -> Reply:
        store = self._store
        fill = await self._filling(digest)
        if fill is not None and not fill.done:
            try:
                await fill.ready.wait()
            except (StreamError, RegistryError):
                fill = None
        if fill is not None and fill.error is not None:
            fill = None
        size = fill.size if fill is not None else store.size_of(digest)
        if size is None or (fill is None and not store.has(digest)):
            raise RegistryError("BLOB_UNKNOWN", "not on this node", {"digest": digest})
        start = 0
        header = request.getHeader(b"range")
        match = _RANGE_RE.fullmatch(header) if header is not None else None
        if match is not None and int(match[1]) < size:
            start = int(match[1])
        headers = {"Content-Length": str(size - start), "Docker-Content-Digest": digest}
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        status = 206 if start else 200
        if request.method == b"HEAD":
            return Reply(status, headers)
        try:
            reader = store.reader(digest, start, size, _ignore)
        except OSError as e:
            raise RegistryError(
                "UNAVAILABLE", f"cannot read {digest}: {e.strerror}", status=503
            ) from e
        store.touch(digest)
        return Reply(status, headers, stream=reader)

    async def _filling(self, digest: str) -> Fill | FollowedFill | None:
        """The fill of *digest* in this process, or in another worker of this node."""
        store = self._store
        fill = store.filling(digest)
        if fill is not None or store.has(digest) or not store.coordinator.held_elsewhere(digest):
            return fill
        # Another worker fills it: followed through its temporary file, as its own
        # clients follow it, at the size it announced to the cluster.
        size = await self._node.filling_size(digest)
        if size is None:
            return None
        log.info("streaming {digest} to a node from another worker's fill", digest=digest)
        return store.follow(digest, size)
