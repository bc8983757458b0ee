"""Docker Hub: official images live under ``library/``."""

from dockmirror.plugins.base import UpstreamPlugin


class DockerHub(UpstreamPlugin):
    name = "dockerhub"
    aliases = ("docker.io", "index.docker.io", "registry-1.docker.io")
    default_url = "https://registry-1.docker.io"
    token_realms = ("https://auth.docker.io",)

    def repository(self, name: str) -> str:
        return name if "/" in name else f"library/{name}"


dockerhub = DockerHub()
