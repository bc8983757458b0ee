"""Benchmark: N clients pulling one cold layer through dockmirror and through
distribution's pull-through proxy, side by side.

For each mirror it measures, against the same upstream registry and layer:
the peak RSS of the mirror process (``VmHWM``), how many times the mirror
fetched the layer from the upstream, and the aggregate client throughput for
a cold run (nothing cached) and a warm run (everything cached).

    PYTHONPATH=. /tmp/venv/bin/python bench/cache_bench.py --clients 8 --size-mib 256

It needs ``docker-registry``, ``skopeo`` and ``curl``; everything listens on
127.0.0.1 and is killed at the end.  Results are printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.integration.images import make_image, push  # noqa: E402
from tests.integration.registries import LOOPBACK, Registry, free_port  # noqa: E402

REPOSITORY = "bench/layer"
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Process:
    """A server in its own process group, waited on until it answers ``/v2/``."""

    def __init__(self, argv: list[str], workdir: Path, port: int, env: dict[str, str]) -> None:
        self.port = port
        self.log = workdir / "server.log"
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                _opener.open(f"http://{LOOPBACK}:{port}/v2/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if time.monotonic() > deadline or self.popen.poll() is not None:
                    self.stop()
                    log = self.log.read_text()
                    raise RuntimeError(f"{argv[0]} did not start:\n{log}") from None
                time.sleep(0.05)

    def memory(self, field: str) -> int:
        """A memory figure of the process (``VmRSS``, ``VmHWM`` for the peak), in bytes."""
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field}")

    def stop(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_dockmirror(
    workdir: Path, upstream: Registry, tls_listen: str | None = None, twistd: tuple[str, ...] = ()
) -> Process:
    """dockmirror on a plain port (waited on), plus an optional TLS listener.

    *twistd* replaces the command that runs twistd.
    """
    port = free_port()
    listen = [f"tcp:{port}:interface={LOOPBACK}", *filter(None, [tls_listen])]
    config = workdir / "dockmirror.toml"
    config.write_text(
        f"""
[server]
listen = {json.dumps(listen)}
public_url = "http://{LOOPBACK}:{port}"
[auth]
database = "{workdir}/keys.sqlite"
[cache]
directory = "{workdir}/cache"
[upstreams.hub]
plugin = "registry"
url = "{upstream.url}"
default = true
"""
    )
    twistd = twistd or (str(Path(sys.executable).with_name("twistd")),)
    argv = [*twistd, "-n", "--pidfile=", "dockmirror", "--config", str(config)]
    return Process(argv, workdir, port, environment())


def start_distribution_proxy(workdir: Path, upstream: Registry) -> Process:
    port = free_port()
    config = {
        "version": "0.1",
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}},
        "http": {"addr": f"{LOOPBACK}:{port}", "secret": "bench"},
        "proxy": {"remoteurl": upstream.url},
    }
    path = workdir / "config.yml"
    path.write_text(json.dumps(config))
    return Process(["docker-registry", "serve", str(path)], workdir, port, environment())


@dataclass
class Run:
    seconds: float
    bytes: int

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.seconds / (1 << 20)


def pull_concurrently(port: int, digest: str, clients: int, size: int) -> Run:
    """Start *clients* curls at once; all must receive the whole layer."""
    url = f"http://{LOOPBACK}:{port}/v2/{REPOSITORY}/blobs/{digest}"
    argv = ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{size_download}", url]
    started = time.monotonic()
    curls = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(clients)]
    sizes = [int(c.communicate()[0]) for c in curls]
    elapsed = time.monotonic() - started
    if sizes != [size] * clients:
        raise RuntimeError(f"clients received {sizes}, expected {size} each")
    return Run(elapsed, sum(sizes))


def measure(name: str, server: Process, upstream: Registry, digest: str, args) -> dict:
    at_start = server.memory("VmRSS")
    before = upstream.count_requests("GET", f"/blobs/{digest}")
    cold = pull_concurrently(server.port, digest, args.clients, args.size)
    fetched = upstream.count_requests("GET", f"/blobs/{digest}") - before
    warm = pull_concurrently(server.port, digest, args.clients, args.size)
    result = {
        "mirror": name,
        "rss_at_start_mib": at_start / (1 << 20),
        "peak_rss_mib": server.memory("VmHWM") / (1 << 20),
        "upstream_fetches": fetched,
        "cold_mib_s": cold.mib_per_s,
        "warm_mib_s": warm.mib_per_s,
    }
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dockmirror-bench-") as tmp:
        root = Path(tmp)
        (root / "upstream").mkdir()
        with Registry(root / "upstream") as upstream:
            # The layer holds incompressible bytes, so its size is about --size-mib.
            image = make_image(root / "layout", "v1", [args.size_mib << 20])
            push(root / "layout", "v1", upstream.host, REPOSITORY)
            layer = image.platforms[0].layers[0]
            args.size = layer.size
            results = []
            for name, start in (
                ("dockmirror", start_dockmirror),
                ("distribution proxy", start_distribution_proxy),
            ):
                (root / name).mkdir()
                server = start(root / name, upstream)
                try:
                    results.append(measure(name, server, upstream, layer.digest, args))
                finally:
                    server.stop()
    report(results, args)


def report(results: list[dict], args) -> None:
    ours, theirs = results
    print(f"{args.clients} clients, one cold layer of {args.size / (1 << 20):.1f} MiB\n")
    print("| | dockmirror | distribution proxy | ratio |")
    print("|---|---:|---:|---:|")
    rows = [
        ("RSS before the clients (MiB)", "rss_at_start_mib", "{:.1f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.1f}"),
        ("upstream fetches of the layer", "upstream_fetches", "{}"),
        ("cold throughput, all clients (MiB/s)", "cold_mib_s", "{:.0f}"),
        ("warm throughput, all clients (MiB/s)", "warm_mib_s", "{:.0f}"),
    ]
    for label, key, fmt in rows:
        ratio = ours[key] / theirs[key] if theirs[key] else float("inf")
        print(f"| {label} | {fmt.format(ours[key])} | {fmt.format(theirs[key])} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
