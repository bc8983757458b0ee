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

    def start_usage(total: int) -> None:
        """Set the cache's usage to *total* bytes, unless a running process already did."""

    def add_usage(delta: int) -> int:
        """Add *delta* to the bytes the cache holds and reserves, for every process at once.

        Returns the new total: the quota is checked against it.
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
