"""Referrers lists (OCI 1.1): what an upstream repository said refers to a manifest.

A list is an image index of descriptors (signatures, attestations, SBOMs)
that the upstream builds on each request, so it has no digest to keep it
by: it is kept per upstream repository, subject digest and ``artifactType``
filter for ``manifest_ttl`` seconds, like a tag, in memory and bounded.
Nothing in a list makes anything readable: the manifests and blobs it names
are proven through the repository one by one, as any other.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from dockmirror import jsontext
from dockmirror.cache.manifests import OCI_INDEX, valid_digest
from dockmirror.reference import MEDIA_TYPE_RE

#: Lists kept, and the bytes they may take together.
ENTRIES = 4096
BYTES = 64 << 20

#: (origin, subject digest, artifactType filter or "").
Key = tuple[str, str, str]


@dataclass
class ReferrersEntry:
    body: bytes
    #: The list holds only the ``artifactType`` asked for (``OCI-Filters-Applied``).
    filtered: bool
    checked: float


def referrers_list(body: bytes, content_type: str | None) -> list[dict[str, Any]] | None:
    """The descriptors of an upstream's referrers answer; None if it is no such list.

    The answer must be an OCI image index, declared so, whose every entry is
    a descriptor with a media type, a digest this mirror can verify and a size.
    """
    if (content_type or "").partition(";")[0].strip().lower() != OCI_INDEX:
        return None
    try:
        data = jsontext.loads(body)
    except ValueError:
        return None
    if (
        not isinstance(data, dict)
        or data.get("schemaVersion") != 2
        or data.get("mediaType", OCI_INDEX) != OCI_INDEX
        or not isinstance(data.get("manifests"), list)
    ):
        return None
    descriptors: list[dict[str, Any]] = data["manifests"]
    for d in descriptors:
        if not (
            isinstance(d, dict)
            and _media_type(d.get("mediaType"))
            and valid_digest(d.get("digest"))
            and isinstance(d.get("size"), int)
            and not isinstance(d.get("size"), bool)
            and d["size"] >= 0
            and ("artifactType" not in d or _media_type(d["artifactType"]))
            and isinstance(d.get("annotations", {}), dict)
        ):
            return None
    return descriptors


def _media_type(value: object) -> bool:
    return isinstance(value, str) and MEDIA_TYPE_RE.fullmatch(value) is not None


def filtered_list(descriptors: list[dict[str, Any]], artifact_type: str | None) -> bytes:
    """An image index of the *descriptors* of one ``artifactType`` (None: all)."""
    kept = [d for d in descriptors if artifact_type in (None, d.get("artifactType"))]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kept}).encode()


class ReferrersCache:
    """The most recently used referrers lists, at most :data:`ENTRIES` and :data:`BYTES`."""

    def __init__(self, reactor: IReactorTime, ttl: float) -> None:
        self._reactor = reactor
        self.ttl = ttl
        self._entries: OrderedDict[Key, ReferrersEntry] = OrderedDict()
        self._bytes = 0

    def __repr__(self) -> str:
        return f"<ReferrersCache {len(self._entries)} lists, {self._bytes} bytes>"

    def get(self, key: Key) -> ReferrersEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def fresh(self, entry: ReferrersEntry) -> bool:
        return self._reactor.seconds() - entry.checked < self.ttl

    def put(self, key: Key, body: bytes, filtered: bool) -> ReferrersEntry:
        self.forget(key)
        entry = self._entries[key] = ReferrersEntry(body, filtered, self._reactor.seconds())
        self._bytes += len(body)
        while len(self._entries) > ENTRIES or self._bytes > BYTES:
            _, oldest = self._entries.popitem(last=False)
            self._bytes -= len(oldest.body)
        return entry

    def forget(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.body)

    def forget_origins(self, origins: Iterable[str]) -> int:
        """Forget the lists of *origins*; returns how many."""
        origins = set(origins)
        gone = [key for key in self._entries if key[0] in origins]
        for key in gone:
            self.forget(key)
        return len(gone)
