"""Any private registry that speaks the distribution API; ``url`` is required."""

from dockmirror.plugins.base import UpstreamPlugin


class Registry(UpstreamPlugin):
    name = "registry"


registry = Registry()
