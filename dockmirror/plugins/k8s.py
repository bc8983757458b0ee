"""The Kubernetes project's registry."""

from dockmirror.plugins.base import UpstreamPlugin


class K8s(UpstreamPlugin):
    name = "k8s"
    aliases = ("registry.k8s.io",)
    default_url = "https://registry.k8s.io"


k8s = K8s()
