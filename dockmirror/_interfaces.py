"""The zope interfaces of dockmirror, in one place."""

from typing import Any

from zope.interface import Attribute, Interface


class IUpstream(Interface):
    """A kind of upstream registry, discovered with ``twisted.plugin``.

    Plugins live in ``dockmirror/plugins/`` (or any directory on that package's
    plugin path) as module-level instances providing both ``IPlugin`` and this
    interface.  :class:`dockmirror.plugins.base.UpstreamPlugin` supplies the
    usual behaviour, so a plugin is mostly data.
    """

    name = Attribute("The value of ``plugin = ...`` in an upstream's config table.")
    aliases = Attribute(
        "Registry host names that route here as path prefixes or ``?ns=`` values;"
        " ``*.example.com`` matches one more label."
    )
    default_url = Attribute("The registry's base URL, or None when ``url`` is required.")
    token_realms = Attribute(
        "Origins (``https://auth.example.com``) of token services on another host than"
        " the registry that may receive the upstream's credentials."
    )

    def base_url(alias: str | None) -> str | None:
        """The base URL for a request routed through *alias* (None: no alias)."""

    def repository(name: str) -> str:
        """Map a client-facing repository name to the upstream's name."""


class ICoordinator(Interface):
    """How the processes sharing one cache directory, and the nodes of a cluster, agree
    on who fills a blob.

    A process that holds a digest's claim is the one fetching it; the others
    follow its temporary file.  A claim ends when its holder releases it or
    dies, so a crashed filler never blocks the digest.  Claims are per
    process: asking about a digest this process claimed is meaningless.
    """

    shared = Attribute("Whether other processes may use the same cache directory.")
    resumes = Attribute(
        "Whether a fill whose body breaks is taken up where it broke, from another node"
        " or the upstream (in a cluster, where a node dying mid-fill must not fail the others)."
    )

    def claim(digest: str) -> bool:
        """Take the right to fill *digest*; False if another process holds it."""

    def release(digest: str) -> None:
        """Give up the claim on *digest* (its fill is committed or failed)."""

    def held_elsewhere(digest: str) -> bool:
        """Whether another process holds the claim on *digest* now."""

    def pin(digest: str) -> bool:
        """Say that this process reads *digest*: another process must not remove it.

        False, and nothing pinned, when another process is removing it (see
        :meth:`exclude`).
        """

    def unpin(digest: str) -> None:
        """This process reads *digest* no more."""

    def exclude(digest: str) -> bool:
        """Keep every other process from pinning *digest*, until :meth:`readmit`.

        False when another process reads it now.  A process removing a blob
        holds this from its look for readers until the file is gone.  Never
        for a digest pinned here.
        """

    def readmit(digest: str) -> None:
        """Let other processes pin *digest* again."""

    def read_at(digest: str, when: float) -> None:
        """Record that this process read *digest* at *when*, for every process to see at once."""

    def last_read(digest: str) -> float | None:
        """When a process last recorded reading *digest*; None if not remembered."""

    def start_usage(total: int) -> None:
        """Set the bytes the cache holds to *total*, unless a running process already did."""

    def add_usage(delta: int) -> int:
        """Add *delta* to the bytes the cache holds, for every process at once.

        Returns the new total of the bytes held and reserved by every live
        process: the quota is checked against it.
        """

    def reserve(delta: int) -> int:
        """Add *delta* to the bytes this process reserves for its fills in progress.

        Reservations are this process's own: when it dies, they stop counting
        (a killed filler leaks no quota).  Returns the new total, as
        :meth:`add_usage` does.
        """

    def promise(delta: int) -> int:
        """Add *delta* to the bytes this process's fills in progress have yet to reserve.

        They are what the upstreams announced beyond the reservations: never
        evicted for, only counted when a fill is admitted.  Like reservations,
        they stop counting when the process dies.  Returns the total of every
        live process.
        """

    def lead(digest: str, size: int, offset: int) -> Any:
        """Called by the process that claimed *digest*, before it fetches it, and again
        if the stream it fetches from breaks at *offset*.

        Fires with None when this process is to fetch the blob from the
        upstream, or with a response (an ``IResponse``, 200 from the start or
        206 from *offset*) streaming it from another node of the cluster that
        fills it or holds it.  Without a cluster, always None.
        """

    def close() -> None:
        """Release every claim."""


class INotifier(Interface):
    """Tells the other processes of the service of events, and hears of theirs.

    A message is a short list of strings; receivers check it as they would
    any input.  A lone process has no one to tell.
    """

    def publish(topic: str, message: list[str]) -> None:
        """Tell every other process of *message* under *topic*."""

    def subscribe(topic: str, listener: Any) -> None:
        """Call ``listener(message)`` for each message another process publishes on *topic*."""


class IBlobStorage(Interface):
    """A tier of blobs by digest below the cache directory, shared by every node.

    The cache directory stays the first tier: a blob found there never
    touches this one.  A blob missing there is looked for here before the
    upstream; a blob filled from the upstream is stored here once verified.
    Manifests are blobs by digest too.  A storage that cannot be reached
    makes the pull fall back to the upstream, never fail.
    """

    redirect = Attribute("Whether a blob GET it can answer gets a redirect to it instead.")
    records = Attribute(
        "The :class:`IStorageRecords` its quota is kept in: this node's, until a cluster"
        " puts the cluster's in, before it starts."
    )

    def open(digest: str, size: int, start: int = 0, end: int | None = None) -> Any:
        """A Deferred firing with an unread response of bytes [start, end) of the blob.

        *size* is the blob's; *end* None is its end.

        Fires with None when the storage does not hold it, or cannot be
        reached now (which is logged).  The blob is kept from eviction until
        :meth:`release`.
        """

    def read_small(digest: str, limit: int) -> Any:
        """A Deferred firing with a small blob (a manifest) whole, and its media type.

        Fires with None when the storage does not hold it, it is over
        *limit* bytes, or the storage cannot be reached now.  The caller
        verifies it.
        """

    def release(digest: str, outcome: Any) -> None:
        """Done reading what :meth:`open` gave: *outcome* is None, or why it failed.

        A stored blob that does not match its digest is removed.
        """

    def location(digest: str) -> Any:
        """A Deferred firing with a short-lived URL that GETs the blob, or None."""

    def upload(fill: Any) -> None:
        """Store the blob that *fill* (a :class:`~dockmirror.cache.fill.Fill`) writes.

        It is stored only once the fill verified it; a fill that fails
        leaves nothing.
        """

    def remove(digest: str) -> bool:
        """Delete a blob (for the operator), unless this node reads or writes it now."""

    def put(digest: str, data: bytes, media_type: str) -> None:
        """Store a small, verified blob (a manifest), in the background."""

    def start(objects: Any) -> None:
        """Begin, with the objects the cache index recorded (digest, size, used)."""

    def stop() -> Any:
        """A Deferred firing once uploads in progress ended (or were aborted)."""

    def stats() -> dict[str, Any]:
        """What the storage holds, as this node knows, and what it is uploading."""


class IStorageRecords(Interface):
    """The objects of the storage tier, for its quota (LRU by last read), and who reads them.

    One node's cache index (SQLite), or, with ``[cluster] database``, the
    cluster's PostgreSQL: then the quota and the LRU order are the whole
    cluster's, and an object read on any node, or being uploaded, is never
    chosen for eviction.  Every Deferred fires, never fails: the records
    degrade to what they can do while their database is away.
    """

    shared = Attribute(
        "Whether the records are the cluster's: an object they do not hold is not in the"
        " bucket for any node, since every upload and deletion goes through them."
    )
    max_size = Attribute("The bucket's quota in bytes, or None.")

    def load(objects: Any) -> None:
        """Take in the objects this node's index recorded (digest, size, used)."""

    def lease(digest: str) -> Any:
        """Say that this node reads *digest* now, until :meth:`release`, and that it was used.

        A Deferred firing with its recorded size, or None when it is not recorded.
        """

    def release(digest: str) -> None:
        """This node reads *digest* once less."""

    def in_use(digest: str) -> bool:
        """Whether this node reads *digest* now."""

    def found(digest: str, size: int) -> None:
        """The bucket holds *digest*, of *size* bytes, and it was just read."""

    def forget(digest: str) -> None:
        """The bucket does not hold *digest* (any more)."""

    def reserve(digest: str, size: int) -> Any:
        """Room for an upload of *digest*: a Deferred firing with the objects to delete first
        (already forgotten), or with why not to upload it (a string).

        A reservation ends with :meth:`uploaded`; each object to delete, with :meth:`evicted`.
        """

    def uploaded(digest: str, size: int, stored: bool) -> None:
        """The upload *digest* reserved room for ended; *stored* says whether it completed."""

    def remove(digest: str) -> Any:
        """A Deferred firing with whether *digest* may be deleted now (for the operator):
        it is forgotten, unless some node reads it or fills it."""

    def evicted(digest: str) -> None:
        """The deletion of *digest*, chosen by :meth:`reserve`, :meth:`remove` or
        :meth:`reconcile`, ended."""

    def listing_due() -> Any:
        """Whether this node is to list the bucket now, and then :meth:`reconcile` the
        records with the listing: paid per 1000 objects, a listing is made once a day by
        one node for all that share the records, sooner after one that failed.

        A Deferred firing with None if not; else with how many listings failed in a row
        before this one, which counts as failed too until :meth:`listed` (the next
        listing is due :func:`~dockmirror.storage.quota.listing_delay` after it starts).
        """

    def listed() -> None:
        """The listing :meth:`listing_due` gave to this node ended well."""

    def reconcile(found: Any, since: float) -> Any:
        """Take in a listing of the bucket begun at *since* (``{digest: (size, modified)}``).

        A Deferred firing with the objects to delete to fit the quota.
        """

    def stats() -> dict[str, Any]:
        """The objects and bytes recorded, as last known."""
