"""The storage tier's objects in one node's cache index (SQLite), for its quota."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the cache imports this package: no cycle when it is imported first
    from dockmirror.cache.index import Index


class IndexRecords:
    """Rows of the ``storage_objects`` table, written behind by the index."""

    def __init__(self, index: Index) -> None:
        self._index = index

    def __repr__(self) -> str:
        return f"<IndexRecords in {self._index.path}>"

    def record(self, digest: str, size: int, used: float) -> None:
        self._index.write(
            "INSERT OR REPLACE INTO storage_objects VALUES (?, ?, ?)", digest, size, used
        )

    def touch(self, digest: str, used: float) -> None:
        self._index.write(
            "UPDATE storage_objects SET used = ? WHERE digest = ?",
            used,
            digest,
            key=("storage used", digest),
        )

    def remove(self, digest: str) -> None:
        self._index.write("DELETE FROM storage_objects WHERE digest = ?", digest)
