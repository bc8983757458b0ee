"""The manifest cache: manifests by digest, and what each tag pointed to.

Manifest bodies are blobs in the :class:`~dockmirror.cache.blobs.BlobStore`,
so they share its quota and LRU; a manifest by digest never changes and is
kept until evicted.  A tag is remembered per media type, because what an
upstream answers for a tag depends on the client's ``Accept``: each client
is answered with an entry it accepts, and any other goes upstream.  Tag
entries are only a cache of what the upstream said: beyond ``max_tags`` tags,
the least recently used are dropped, which costs them a revalidation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dockmirror import jsontext
from dockmirror.cache.blobs import BlobStore
from dockmirror.cache.index import Index, Snapshot
from dockmirror.errors import RegistryError
from dockmirror.reference import TAG_RE, check_digest, is_digest

log = Logger()

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"

#: Media types in the order a tag's cached entries are preferred: an upstream
#: answers with the image's own form (an index for a multi-platform image)
#: whenever the client accepts it, and converts only for clients that don't.
PREFERENCE = (
    OCI_INDEX,
    DOCKER_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    SCHEMA1_SIGNED,
    SCHEMA1,
)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
#: The longest origin (upstream, repository and URL) taken from another process.
ORIGIN_MAX = 1024
#: Tags kept, unless ``[cache] max_tags`` says otherwise.
MAX_TAGS = 100_000


def accepted(accept: str | None) -> set[str] | None:
    """The media types an ``Accept`` header names; None when it accepts anything."""
    if not accept:
        return None
    types = set()
    for part in accept.split(","):
        media_type, *params = (p.strip() for p in part.split(";"))
        quality = next((p[2:] for p in params if p.lower().startswith("q=")), "1")
        try:
            if float(quality) <= 0:
                continue
        except ValueError:
            pass
        media_type = media_type.lower()
        if media_type in ("*/*", "application/*"):
            return None
        if media_type:
            types.add(media_type)
    return types


#: Content types some registries give a manifest whose body names its type.
GENERIC_TYPES = ("application/json",)


def _bare(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def could_be_manifest(content_type: str | None) -> bool:
    """Whether an upstream's ``Content-Type`` may be a manifest's (not a login page's)."""
    return content_type is None or _bare(content_type) in (*PREFERENCE, *GENERIC_TYPES)


def manifest_media_type(body: bytes, content_type: str | None) -> str | None:
    """The media type of a manifest an upstream served; None if *body* is no manifest.

    A manifest is a JSON object with a known ``mediaType``, or without one
    but with ``schemaVersion`` 1 or 2 (Docker's schema 1, OCI manifests
    that leave it out).  A type in the body must agree with a specific
    ``Content-Type``; a missing or generic one is read from the body.
    """
    if not could_be_manifest(content_type):
        return None
    try:
        data = jsontext.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    declared = _bare(content_type) if content_type else None
    specific = declared if declared in PREFERENCE else None
    media_type = data.get("mediaType")
    if media_type is not None:
        if media_type not in PREFERENCE or specific not in (None, media_type):
            return None
        return str(media_type)
    version = data.get("schemaVersion")
    if version == 1 and not isinstance(version, bool):
        default = SCHEMA1_SIGNED if "signatures" in data else SCHEMA1
    elif version == 2 and not isinstance(version, bool):
        default = OCI_INDEX if "manifests" in data else OCI_MANIFEST
    else:
        return None
    return specific or default


def references(body: bytes, platforms: Collection[str] = ()) -> list[tuple[str, int | None]]:
    """The (digest, size) of every blob and manifest a manifest refers to.

    With *platforms* (``os/arch`` or ``os/arch/variant``), an index's
    manifests are only those of these platforms; ``os/arch`` takes any variant.
    """
    try:
        data = jsontext.loads(body)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    descriptors: list[Any] = []
    if isinstance(data.get("config"), dict):
        descriptors.append(data["config"])
    for key in ("layers", "manifests", "blobs"):
        if isinstance(data.get(key), list):
            descriptors.extend(data[key])
    if platforms and isinstance(data.get("manifests"), list):
        descriptors = [d for d in descriptors if _of_platform(d, platforms)]
    found = []
    for d in descriptors:
        if isinstance(d, dict) and valid_digest(d.get("digest")):
            size = d.get("size")
            found.append((d["digest"], size if isinstance(size, int) and size >= 0 else None))
    for layer in data.get("fsLayers") or ():  # schema 1
        if isinstance(layer, dict) and valid_digest(layer.get("blobSum")):
            found.append((layer["blobSum"], None))
    return found


def _of_platform(descriptor: Any, platforms: Collection[str]) -> bool:
    platform = descriptor.get("platform") if isinstance(descriptor, dict) else None
    if not isinstance(platform, dict):
        return False
    name = f"{platform.get('os')}/{platform.get('architecture')}"
    return name in platforms or f"{name}/{platform.get('variant')}" in platforms


def valid_digest(digest: object) -> bool:
    """Whether an upstream's *digest* is one this mirror can verify (and use as a file name)."""
    try:
        return isinstance(digest, str) and bool(check_digest(digest))
    except RegistryError:
        return False


#: A tag entry of another node: media type, digest, manifest, when it was resolved.
SharedTag = tuple[str, str, bytes, float]


class SharedTags(Protocol):
    """Tag entries shared by the nodes of a cluster, with their manifests."""

    async def tags(self, origin: str, tag: str, since: float) -> list[SharedTag]:
        """(media type, digest, manifest, resolved) of *tag* resolved after *since*."""

    def publish(
        self, origin: str, tag: str, media_type: str, digest: str, body: bytes, resolved: float
    ) -> None: ...

    def expire(self, origin: str, tag: str, keep: str, expired: float) -> None: ...

    def forget(self, origins: Iterable[str], tag: str | None = None) -> None: ...

    async def manifest(self, digest: str, limit: int) -> bytes | None:
        """The manifest *digest* (of *limit* bytes at most) as another node holding it
        serves it; None if none does."""


@dataclass
class TagEntry:
    digest: str
    media_type: str
    checked: float


class ManifestCache:
    def __init__(
        self,
        store: BlobStore,
        index: Index,
        reactor: IReactorTime,
        ttl: float,
        max_tags: int = MAX_TAGS,
    ) -> None:
        self.store = store
        self.ttl = ttl
        #: The most tags kept; beyond them, the least recently used are dropped.
        self.max_tags = max_tags
        self._index = index
        self._reactor = reactor
        self._types: dict[str, str] = {}
        #: (origin, tag) -> media type -> entry; least recently used first.
        self._tags: OrderedDict[tuple[str, str], dict[str, TagEntry]] = OrderedDict()
        #: manifest digest -> the (origin, tag) keys with an entry pointing to it.
        self._tagged: dict[str, set[tuple[str, str]]] = {}
        #: The tags of the other nodes of a cluster; None for a node alone.
        self.shared: SharedTags | None = None
        store.on_remove.append(self._removed)

    def __repr__(self) -> str:
        return f"<ManifestCache {len(self._types)} manifests, {len(self._tags)} tags>"

    def recover(self, snapshot: Snapshot) -> None:
        for digest, media_type in snapshot.manifests:
            if self.store.has(digest):
                self._types[digest] = media_type
        for origin, tag, media_type, digest, checked in sorted(snapshot.tags, key=_checked):
            if digest in self._types:
                self._keep((origin, tag), TagEntry(digest, media_type, checked))
        self._index.write("DELETE FROM tags WHERE digest NOT IN (SELECT digest FROM manifests)")

    def _removed(self, digest: str) -> None:
        """Forget an evicted (or purged) manifest, and the tag entries pointing to it."""
        self._types.pop(digest, None)
        keys = self._tagged.pop(digest, set())
        for key in keys:
            entries = self._tags.get(key, {})
            for media_type in [m for m, e in entries.items() if e.digest == digest]:
                del entries[media_type]
            if not entries:
                self._tags.pop(key, None)
        if keys:
            self._index.write("DELETE FROM tags WHERE digest = ?", digest)

    def _keep(self, key: tuple[str, str], entry: TagEntry) -> None:
        entries = self._tags.setdefault(key, {})
        self._tags.move_to_end(key)
        old = entries.get(entry.media_type)
        entries[entry.media_type] = entry
        if old is not None:
            self._unlink(key, old.digest)
        self._tagged.setdefault(entry.digest, set()).add(key)
        while len(self._tags) > self.max_tags:
            oldest = next(iter(self._tags))
            self._drop(oldest)
            self._index.write("DELETE FROM tags WHERE origin = ? AND tag = ?", *oldest)

    def _unlink(self, key: tuple[str, str], digest: str) -> None:
        """Drop *key* from *digest*'s tags unless another of its entries still points there."""
        if any(e.digest == digest for e in self._tags.get(key, {}).values()):
            return
        keys = self._tagged.get(digest)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._tagged[digest]

    def _drop(self, key: tuple[str, str]) -> bool:
        entries = self._tags.pop(key, None)
        for entry in (entries or {}).values():
            self._unlink(key, entry.digest)
        return entries is not None

    # --- reading -----------------------------------------------------------------

    def get(self, digest: str) -> tuple[bytes, str] | None:
        """A cached manifest's body and media type."""
        media_type = self._types.get(digest)
        if media_type is None:
            return None
        body = self.store.read_small(digest)
        return None if body is None else (body, media_type)

    def get_type(self, digest: str) -> str:
        return self._types[digest]

    def has(self, digest: str) -> bool:
        return digest in self._types and self.store.has(digest)

    def tag(self, origin: str, tag: str, accept: set[str] | None) -> TagEntry | None:
        """The preferred cached entry for a tag that the client accepts."""
        entries = self._tags.get((origin, tag), {})
        if entries:
            self._tags.move_to_end((origin, tag))
        usable = [
            e
            for e in entries.values()
            if (accept is None or e.media_type in accept) and self.has(e.digest)
        ]
        if not usable:
            return None
        return min(usable, key=lambda e: _rank(e.media_type))

    def fresh(self, entry: TagEntry) -> bool:
        return self._reactor.seconds() - entry.checked < self.ttl

    # --- writing -----------------------------------------------------------------

    async def put(
        self, origin: str, reference: str, digest: str, media_type: str, body: bytes
    ) -> None:
        """Keep a verified manifest fetched from *origin*.

        The manifest is recorded as readable through *origin*, which just
        served it; what it refers to is not: a manifest may name blobs its
        repository does not hold (foreign layers, or any digest at all), and
        sizes that are wrong.  Those are proven one by one, by the upstream's
        answer to a HEAD or GET of each.
        """
        if await self.store.put_small(digest, body):
            self._record(origin, reference, digest, media_type, write=True, body=body)

    def _record(
        self,
        origin: str,
        reference: str,
        digest: str,
        media_type: str,
        write: bool,
        body: bytes | None = None,
    ) -> None:
        """Record a cached manifest as *origin* served it; *write* it to the index, or not."""
        self.store.allow(origin, digest)
        if self._types.get(digest) != media_type:
            self._types[digest] = media_type
            if write:
                self._index.write(
                    "INSERT OR REPLACE INTO manifests VALUES (?, ?)", digest, media_type
                )
        if not is_digest(reference):
            self.set_tag(origin, reference, digest, media_type, write, body)

    def fetched_elsewhere(self, result: list[str]) -> None:
        """Take in a manifest that another process fetched and cached.

        *result* is ``[origin, reference, digest, media type]``, checked as
        any input: the manifest counts only if its file is in the cache.
        """
        if len(result) != 4:
            return
        origin, reference, digest, media_type = result
        if (
            len(origin) <= ORIGIN_MAX
            and (is_digest(reference) or TAG_RE.fullmatch(reference))
            and valid_digest(digest)
            and media_type in PREFERENCE
            and self.store.has(digest)
        ):
            self._record(origin, reference, digest, media_type, write=False)

    def set_tag(
        self,
        origin: str,
        tag: str,
        digest: str,
        media_type: str,
        write: bool = True,
        body: bytes | None = None,
    ) -> None:
        """Record that *tag* is *digest* in *media_type*, as the upstream said just now.

        The process that *write*-s it to the index tells the other nodes too.
        """
        now = self._reactor.seconds()
        self._set_tag(origin, tag, TagEntry(digest, media_type, now), write)
        if self.shared is not None and write:
            body = body if body is not None else self.store.read_small(digest)
            if body is not None:
                self.shared.publish(origin, tag, media_type, digest, body, now)

    def _set_tag(self, origin: str, tag: str, entry: TagEntry, write: bool = True) -> None:
        self._keep((origin, tag), entry)
        if write:
            self._index.write(
                "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)",
                origin,
                tag,
                entry.media_type,
                entry.digest,
                entry.checked,
            )

    async def adopt_tag(self, origin: str, tag: str, stale: bool = False) -> bool:
        """Take in what another node of the cluster resolved *tag* to, if it is still fresh
        (or whenever that was, if *stale*: to be served while the upstream fails).

        Each manifest is checked against its digest and media type, as one
        from an upstream would be: a node trusts no other with its content.
        """
        if self.shared is None:
            return False
        adopted = False
        since = float("-inf") if stale else self._reactor.seconds() - self.ttl
        for media_type, digest, body, resolved in await self.shared.tags(origin, tag, since):
            algorithm, _, hexpart = digest.partition(":")
            if (
                not valid_digest(digest)
                or hashlib.new(algorithm, body).hexdigest() != hexpart
                or manifest_media_type(body, media_type) != media_type
            ):
                continue
            current = self._tags.get((origin, tag), {}).get(media_type)
            if current is not None and current.checked >= resolved:
                continue
            if await self.store.put_small(digest, body):
                self._record(origin, digest, digest, media_type, write=True)
                self._set_tag(origin, tag, TagEntry(digest, media_type, resolved))
                adopted = True
        return adopted

    async def adopt_manifest(self, origin: str, digest: str, media_type: str, limit: int) -> bool:
        """Take in manifest *digest*, of *media_type* and *limit* bytes at most, from
        another node of the cluster that holds it, once *origin* proved (to any node)
        that it has it.

        It is checked against its digest and media type, as one from an
        upstream would be.
        """
        if self.shared is None or not await self.store.proved_elsewhere(origin, digest):
            return False
        body = await self.shared.manifest(digest, limit)
        if body is None:
            return False
        algorithm, _, hexpart = digest.partition(":")
        if (
            not valid_digest(digest)
            or hashlib.new(algorithm, body).hexdigest() != hexpart
            or manifest_media_type(body, media_type) != media_type
        ):
            log.warn("a node served {digest} with other content: ignored", digest=digest)
            return False
        if not await self.store.put_small(digest, body):
            return False
        self._record(origin, digest, digest, media_type, write=True)
        return True

    def expire_tag(self, origin: str, tag: str, keep: str) -> None:
        """Have a moved tag's entries other than *keep*'s media type revalidated at next use.

        An entry of another media type (a platform's manifest, for a client
        that takes no index) may still name the tag's old content.
        """
        expired = self._reactor.seconds() - self.ttl
        for media_type, entry in self._tags.get((origin, tag), {}).items():
            if media_type != keep and entry.checked > expired:
                entry.checked = expired
                if self.shared is not None:
                    self.shared.expire(origin, tag, keep, expired)
                self._index.write(
                    "UPDATE tags SET checked = ? WHERE origin = ? AND tag = ? AND media_type = ?",
                    expired,
                    origin,
                    tag,
                    media_type,
                )

    def forget_tag(self, origin: str, tag: str) -> None:
        if self.shared is not None:
            self.shared.forget([origin], tag)
        if self._drop((origin, tag)):
            self._index.write("DELETE FROM tags WHERE origin = ? AND tag = ?", origin, tag)

    def forget_origins(self, origins: Iterable[str]) -> int:
        """Forget every tag of *origins*; returns how many."""
        origins = set(origins)
        if self.shared is not None:
            self.shared.forget(origins)
        gone = [key for key in self._tags if key[0] in origins]
        for key in gone:
            self._drop(key)
        self._index.write_many("DELETE FROM tags WHERE origin = ?", ((o,) for o in origins))
        return len(gone)

    def tag_origins(self) -> set[str]:
        return {origin for origin, _ in self._tags}

    def stats(self) -> dict[str, int]:
        return {"manifests": len(self._types), "tags": len(self._tags)}


def _checked(row: tuple[str, str, str, str, float]) -> float:
    return row[4]


def _rank(media_type: str) -> int:
    return PREFERENCE.index(media_type) if media_type in PREFERENCE else len(PREFERENCE)
