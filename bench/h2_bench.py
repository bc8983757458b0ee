"""Benchmark: dockmirror over TLS with HTTP/1.1 only, and with HTTP/2 offered by ALPN.

Two dockmirror processes serve the same upstream image from a warm cache: one
as shipped (ALPN offers only ``http/1.1``), and one offering ``h2`` then
``http/1.1``, as Twisted's ``Site`` does when ``h2`` and ``priority`` are
installed, so that it speaks HTTP/2 to curl ``--http2``.  dockmirror has no
setting for that: the second process is started through :data:`H2_TWISTD`.

First, once per protocol on the fresh process, one client reads the big
layer with ``--limit-rate`` for a while, and the mirror's RSS is sampled:
with backpressure it stops growing once the client stops reading, instead
of growing with the layer.  Then repetitions alternate between the two
processes, and each reports:

- big: *clients* curls at once on the big layer, aggregate MiB/s;
- small: the small layers fetched *rounds* times by one curl, requests/s,
  one after another (on one connection), then with ``--parallel`` (HTTP/1.1:
  several connections; h2: streams multiplexed on one connection);
- the peak RSS of the mirror during each of those (``VmHWM``, reset through
  ``/proc/PID/clear_refs`` before each phase; it cannot go below the RSS
  left by the phases before).

It needs ``docker-registry``, ``skopeo``, ``curl`` built with HTTP2, and the
``h2`` and ``priority`` packages (not dockmirror dependencies)::

    pip install --target /tmp/h2-site h2 priority
    PYTHONPATH=/tmp/h2-site python -m bench.h2_bench --repeat 5

Results are printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.servers import Process, start_dockmirror
from tests.integration.clients import ServerTLS, make_server_tls, tls_endpoint
from tests.integration.images import Layer, make_image, push
from tests.integration.registries import LOOPBACK, Registry, free_port

REPOSITORY = "bench/layer"

MIB = 1 << 20
PROTOCOLS = {"http/1.1": ("--http1.1", "1.1"), "h2": ("--http2", "2")}
#: twistd, with the site offering what Twisted's Site offers by ALPN: h2 first.
H2_TWISTD = (
    sys.executable,
    "-c",
    "from twisted.web.server import Site\n"
    "from dockmirror.web import MirrorSite\n"
    "MirrorSite.acceptableProtocols = Site.acceptableProtocols\n"
    "from twisted.scripts.twistd import run\n"
    "run()\n",
)


class Mirror:
    """A warm dockmirror with a TLS listener, and what curl needs to reach it."""

    def __init__(self, process: Process, tls_port: int, tls: ServerTLS, protocol: str) -> None:
        self.process = process
        self.tls_port = tls_port
        self.tls = tls
        self.flag, self.version = PROTOCOLS[protocol]

    def url(self, digest: str) -> str:
        return f"https://{LOOPBACK}:{self.tls_port}/v2/{REPOSITORY}/blobs/{digest}"

    def curl(self, *args: str) -> list[str]:
        return [
            "curl",
            "-sS",
            "--no-progress-meter",
            "--noproxy",
            "*",
            "--cacert",
            str(self.tls.ca),
            self.flag,
            *args,
        ]

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.popen.pid}/clear_refs").write_text("5")

    def peak_mib(self) -> float:
        return self.process.memory("VmHWM") / MIB


def check(output: bytes, version: str, expected: list[int]) -> None:
    """Every transfer used *version* and got its whole blob (``-w`` lines)."""
    lines = [line.split() for line in output.decode().splitlines()]
    versions = {v for v, _ in lines}
    sizes = sorted(int(s) for _, s in lines)
    if versions != {version} or sizes != sorted(expected):
        raise RuntimeError(f"expected HTTP/{version} and sizes {sorted(expected)}, got {lines}")


WRITE_OUT = "%{http_version} %{size_download}\\n"


def big(mirror: Mirror, layer: Layer, clients: int) -> float:
    """Aggregate MiB/s of *clients* curls reading the big layer at once."""
    argv = mirror.curl("-o", "/dev/null", "-w", WRITE_OUT, mirror.url(layer.digest))
    started = time.monotonic()
    curls = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(clients)]
    output = b"".join(c.communicate()[0] for c in curls)
    elapsed = time.monotonic() - started
    check(output, mirror.version, [layer.size] * clients)
    return clients * layer.size / elapsed / MIB


def small(mirror: Mirror, layers: list[Layer], rounds: int, parallel: bool) -> float:
    """Requests/s of one curl fetching each small layer *rounds* times."""
    config = "".join(
        f'url = "{mirror.url(layer.digest)}"\noutput = "/dev/null"\n'
        for _ in range(rounds)
        for layer in layers
    )
    flags = ["--parallel", "--parallel-max", str(len(layers))] if parallel else []
    argv = mirror.curl(*flags, "-w", WRITE_OUT, "-K", "-")
    started = time.monotonic()
    output = subprocess.run(argv, input=config.encode(), stdout=subprocess.PIPE, check=True).stdout
    elapsed = time.monotonic() - started
    check(output, mirror.version, [layer.size for layer in layers] * rounds)
    return rounds * len(layers) / elapsed


def slow_client(mirror: Mirror, layer: Layer, rate: str, seconds: float) -> list[float]:
    """The mirror's RSS (MiB) each second while one rate-limited client reads."""
    argv = mirror.curl("--limit-rate", rate, "-o", "/dev/null", mirror.url(layer.digest))
    samples = [mirror.process.memory("VmRSS") / MIB]
    curl = subprocess.Popen(argv)
    try:
        for _ in range(int(seconds)):
            time.sleep(1)
            samples.append(mirror.process.memory("VmRSS") / MIB)
    finally:
        curl.kill()
        curl.wait()
    return samples


@contextmanager
def mirrors(root: Path, upstream: Registry, layers: list[Layer]) -> Iterator[dict[str, Mirror]]:
    """Both mirrors, each with every layer cached."""
    tls = make_server_tls(root, "localhost")
    with ExitStack() as stack:
        started = {}
        for protocol in PROTOCOLS:
            workdir = root / protocol.replace("/", "")
            workdir.mkdir()
            port = free_port()
            listen = tls_endpoint(port, LOOPBACK, tls)
            twistd = H2_TWISTD if protocol == "h2" else ()
            process = start_dockmirror(workdir, upstream, listen, twistd)
            stack.callback(process.stop)
            started[protocol] = Mirror(process, port, tls, protocol)
            # Warm over plain HTTP, so the TLS listener has served nothing yet.
            plain = f"http://{LOOPBACK}:{process.port}/v2/{REPOSITORY}/blobs"
            warm = "".join(f'url = "{plain}/{x.digest}"\noutput = "/dev/null"\n' for x in layers)
            subprocess.run(
                ["curl", "-sSf", "--noproxy", "*", "-K", "-"], input=warm.encode(), check=True
            )
        yield started


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--big-mib", type=int, default=128)
    parser.add_argument("--small-count", type=int, default=20)
    parser.add_argument("--small-kib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10, help="fetches of each small layer")
    parser.add_argument("--slow-rate", default="1M")
    parser.add_argument("--slow-seconds", type=float, default=15)
    args = parser.parse_args()
    phases = {
        "big": lambda m: big(m, layers[0], args.clients),
        "small, one after another": lambda m: small(m, layers[1:], args.rounds, False),
        "small, --parallel": lambda m: small(m, layers[1:], args.rounds, True),
    }
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dockmirror-h2-bench-") as tmp:
        root = Path(tmp)
        (root / "upstream").mkdir()
        with Registry(root / "upstream") as upstream:
            sizes = [args.big_mib * MIB] + [args.small_kib << 10] * args.small_count
            image = make_image(root / "layout", "v1", sizes)
            push(root / "layout", "v1", upstream.host, REPOSITORY)
            layers = list(image.platforms[0].layers)
            with mirrors(root, upstream, layers) as started:
                slow = {
                    protocol: slow_client(mirror, layers[0], args.slow_rate, args.slow_seconds)
                    for protocol, mirror in started.items()
                }
                for repetition in range(args.repeat):
                    for protocol, mirror in started.items():
                        for phase, run in phases.items():
                            mirror.reset_peak()
                            value = run(mirror)
                            result = (value, mirror.peak_mib())
                            results.setdefault((phase, protocol), []).append(result)
                            print(repetition, protocol, phase, result, file=sys.stderr)
    report(results, slow, layers, args)


def report(results, slow, layers: list[Layer], args) -> None:
    print(
        f"{args.repeat} repetitions; median (min–max).  Big: {args.clients} clients on one"
        f" {layers[0].size / MIB:.0f} MiB layer.  Small: {len(layers) - 1} layers of"
        f" {layers[1].size / 1024:.0f} KiB, each fetched {args.rounds} times by one curl.\n"
    )
    print("| | HTTP/1.1 | h2 | ratio h2 / 1.1 (min–max) |")
    print("|---|---:|---:|---:|")
    for phase, unit in (
        ("big", "MiB/s"),
        ("small, one after another", "requests/s"),
        ("small, --parallel", "requests/s"),
    ):
        for index, label in ((0, f"{phase} ({unit})"), (1, f"{phase}: peak RSS (MiB)")):
            ones = [r[index] for r in results[(phase, "http/1.1")]]
            twos = [r[index] for r in results[(phase, "h2")]]
            ratios = [b / a for a, b in zip(ones, twos, strict=True)]
            print(
                f"| {label} | {spread(ones)} | {spread(twos)} | {statistics.median(ratios):.2f}"
                f" ({min(ratios):.2f}–{max(ratios):.2f}) |"
            )
    keep_alive = [r[0] for r in results[("small, one after another", "http/1.1")]]
    multiplexed = [r[0] for r in results[("small, --parallel", "h2")]]
    ratios = [b / a for a, b in zip(keep_alive, multiplexed, strict=True)]
    print(
        f"\nh2 multiplexed (--parallel) / HTTP/1.1 one after another on one connection:"
        f" {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
    )
    print(f"\nOne client at {args.slow_rate}B/s on the big layer, RSS (MiB) once a second:\n")
    for protocol, samples in slow.items():
        print(f"- {protocol}: {' '.join(f'{s:.0f}' for s in samples)}")
    print(json.dumps({"results": {f"{k[0]} {k[1]}": v for k, v in results.items()}, "slow": slow}))


if __name__ == "__main__":
    main()
