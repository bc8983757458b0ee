"""The zope interfaces of dockmirror, in one place."""

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
