"""What the clients do: curl on a blob or a manifest, skopeo on a whole image.

Every workload checks what the clients received (every byte of every blob,
every HEAD answered 200 on one connection) and raises otherwise: a fast
wrong answer is not a result.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.integration.clients import ServerTLS
from tests.integration.registries import subprocess_env

MIB = 1 << 20


class Client:
    """curl and skopeo options to reach one server at *base* (``scheme://host:port``)."""

    def __init__(self, base: str, tls: ServerTLS | None) -> None:
        self.base = base
        self.tls = tls

    def curl(self, *args: str) -> list[str]:
        ca = ["--cacert", str(self.tls.ca)] if self.tls else []
        return ["curl", "-sS", "--noproxy", "*", "--http1.1", *ca, *args]


def fetch(client: Client, path: str, clients: int, size: int, *options: str) -> float:
    """Seconds until *clients* curls started at once have each received *size* bytes.

    *options* are more curl options (a header).
    """
    argv = client.curl(
        "-f", "-o", "/dev/null", "-w", "%{size_download}", *options, client.base + path
    )
    started = time.monotonic()
    curls = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(clients)]
    sizes = [int(c.communicate()[0] or 0) for c in curls]
    elapsed = time.monotonic() - started
    if sizes != [size] * clients:
        raise RuntimeError(f"{client.base}{path}: clients received {sizes}, expected {size} each")
    return elapsed


def head_rate(client: Client, path: str, count: int, accept: str) -> float:
    """``HEAD`` requests per second, one after another on one kept-alive connection."""
    config = f'url = "{client.base}{path}"\noutput = "/dev/null"\n' * count
    argv = client.curl(
        "-I", "-H", f"Accept: {accept}", "-w", "%{http_code} %{num_connects}\\n", "-K", "-"
    )
    started = time.monotonic()
    output = subprocess.run(argv, input=config.encode(), stdout=subprocess.PIPE, check=True).stdout
    elapsed = time.monotonic() - started
    lines = [line.split() for line in output.decode().splitlines()]
    codes = {code for code, _ in lines}
    connects = sum(int(n) for _, n in lines)
    if len(lines) != count or codes != {"200"} or connects != 1:
        raise RuntimeError(
            f"{client.base}{path}: {len(lines)} answers {codes}, {connects} connections"
        )
    return count / elapsed


def skopeo_copy(source: str, tls: ServerTLS | None, scratch: Path) -> float:
    """Seconds for ``skopeo copy`` of the image at *source* (``host:port/repo:tag``)."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        if tls:
            certs = Path(tmp) / "certs"
            certs.mkdir()
            shutil.copy(tls.ca, certs / "ca.crt")
            verify = [f"--src-cert-dir={certs}"]
        else:
            verify = ["--src-tls-verify=false"]
        argv = ["skopeo", "copy", "-q", *verify, f"docker://{source}", f"dir:{tmp}/image"]
        started = time.monotonic()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=subprocess_env())
        return time.monotonic() - started
