"""GitHub Container Registry."""

from dockmirror.plugins.base import UpstreamPlugin


class GHCR(UpstreamPlugin):
    name = "ghcr"
    aliases = ("ghcr.io",)
    default_url = "https://ghcr.io"


ghcr = GHCR()
