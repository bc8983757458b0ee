"""The common behaviour of upstream plugins."""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from dockmirror._interfaces import IUpstream
from dockmirror.hostnames import HostPattern, parse_host


def alias_matches(alias: str, patterns: tuple[str, ...]) -> bool:
    """Whether a registry host name matches one of *patterns* (``*.`` is one label)."""
    name = parse_host(alias)
    return name is not None and any(HostPattern.parse(p).matches(name) for p in patterns)


@implementer(IPlugin, IUpstream)
class UpstreamPlugin:
    """A registry reached at one URL whatever alias routed the request.

    Subclasses set ``name``, ``aliases``, ``default_url`` and, for a token
    service on another host than the registry, ``token_realms``, and override
    :meth:`base_url` or :meth:`repository` for their registry's quirks.
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    default_url: str | None = None
    token_realms: tuple[str, ...] = ()

    def base_url(self, alias: str | None) -> str | None:
        return self.default_url

    def repository(self, name: str) -> str:
        return name

    def __repr__(self) -> str:
        return f"<upstream plugin {self.name!r} {self.default_url or '(url required)'}>"
