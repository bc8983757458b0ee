"""Google Container Registry: each regional host is its own registry."""

from dockmirror.plugins.base import UpstreamPlugin, alias_matches


class GCR(UpstreamPlugin):
    name = "gcr"
    aliases = ("gcr.io", "*.gcr.io")
    default_url = "https://gcr.io"

    def base_url(self, alias: str | None) -> str | None:
        if alias and alias_matches(alias, self.aliases):
            return f"https://{alias}"
        return self.default_url


gcr = GCR()
