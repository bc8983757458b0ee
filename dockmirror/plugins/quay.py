"""Red Hat Quay."""

from dockmirror.plugins.base import UpstreamPlugin


class Quay(UpstreamPlugin):
    name = "quay"
    aliases = ("quay.io",)
    default_url = "https://quay.io"


quay = Quay()
