"""dockmirror side by side with distribution's proxy mode: ``python -m bench``.

One upstream (distribution with token auth, as in the tests) holds a
generated image with one big layer.  dockmirror and distribution in proxy
mode (``proxy: remoteurl:``) both pull through it, both over TLS with the
same certificate, or both over plain HTTP with ``--plain`` (then nginx with
``sendfile on`` serves the cached layer's file too, if it is installed).
Each repetition runs every workload against every server, rotating which
goes first; a cold run gets a fresh server with an empty cache.  The table
gives the median, min and max of each figure, and the ratio of the two
servers' figures from the same repetition.

The figures are goals for the code, never assertions: the command exits 0
whatever they are.  It writes the raw runs as JSON, and a PNG chart when
matplotlib is installed (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench import cluster, report
from bench.servers import MIB, Mirror, Process, blob_fetches, start_nginx
from bench.workloads import Client, fetch, head_rate, skopeo_copy
from tests.integration.clients import ServerTLS, make_server_tls
from tests.integration.images import OCI_MANIFEST, Image, make_image, push
from tests.integration.registries import LOOPBACK, Registry, TokenServer
from tests.integration.relay import Fault, Relay

GIB = 1 << 30
REPOSITORY = "bench/image"
TAG = "v1"
WORKLOADS = ("hit", "cold", "heads", "skopeo", "parallel")
#: Run only when asked for with ``--only``: it needs PostgreSQL.
OPTIONAL_WORKLOADS = ("cluster",)


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plain", action="store_true", help="plain HTTP instead of TLS")
    parser.add_argument("--size-mib", type=int, default=256, help="the big layer's size")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="repetitions of every workload (default 3; 5 or more for figures to publish)",
    )
    parser.add_argument(
        "--clients", default="1,8", help="client counts for the cache-hit runs (default 1,8)"
    )
    parser.add_argument("--cold-clients", type=int, default=16)
    parser.add_argument(
        "--workers",
        default="1",
        help="dockmirror's [server] workers, one dockmirror per count (e.g. 1,2,4; default 1)",
    )
    parser.add_argument("--heads", type=int, default=200, help="manifest HEADs per run")
    parser.add_argument("--nodes", type=int, default=3, help="nodes of the cluster run")
    parser.add_argument(
        "--cluster-clients", type=int, default=24, help="clients of the cluster run"
    )
    parser.add_argument(
        "--cap-mib",
        type=float,
        default=4.0,
        help="the parallel workload's capped link: MiB/s per TCP connection (default 4)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        metavar="CHECKOUT",
        help="also run the dockmirror of another checkout (with its .venv), e.g. main's",
    )
    parser.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"the workloads to run, of {','.join(WORKLOADS + OPTIONAL_WORKLOADS)}"
        f" (default: {','.join(WORKLOADS)}; cluster needs PostgreSQL)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--chart", type=Path, default=Path("bench-results.png"))
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 8 MiB, one repetition, 50 HEADs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.repeat, args.heads, args.cold_clients = 8, 1, 50, 4
    args.clients = sorted({int(n) for n in args.clients.split(",")})
    args.workers = sorted({int(n) for n in args.workers.split(",")})
    args.only = [w.strip() for w in args.only.split(",")]
    unknown = set(args.only) - set(WORKLOADS + OPTIONAL_WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


def mirror_name(workers: int) -> str:
    """``dockmirror``, or ``dockmirror-wN`` with N workers."""
    return "dockmirror" if workers == 1 else f"dockmirror-w{workers}"


class Bench:
    """The upstream, the warm servers, and every figure gathered so far."""

    def __init__(self, root: Path, args: argparse.Namespace, upstream: Registry) -> None:
        self.root = root
        self.args = args
        self.upstream = upstream
        self.tls: ServerTLS | None = None if args.plain else make_server_tls(root, "localhost")
        self.mirrors = [
            *(
                Mirror(mirror_name(workers), "dockmirror", self.tls, workers=workers)
                for workers in args.workers
            ),
            *(
                Mirror(f"dockmirror@{checkout.name}", "dockmirror", self.tls, checkout.resolve())
                for checkout in args.baseline
            ),
            Mirror("distribution", "distribution", self.tls),
        ]
        self.runs = report.Runs()
        self.warm: dict[str, Process] = {}
        self.nginx: Process | None = None
        self.backends: cluster.Backends | None = None
        self._fresh = 0

    def client(self, server: Process, tls: ServerTLS | None) -> Client:
        scheme = "https" if tls else "http"
        return Client(f"{scheme}://{LOOPBACK}:{server.port}", tls)

    def prepare(self) -> Image:
        """Push the image upstream and start a warm server of each kind."""
        layout = self.root / "layout"
        image = make_image(layout, TAG, [self.args.size_mib * MIB, 1 << 20])
        push(layout, TAG, self.upstream.host, REPOSITORY, self.upstream.creds)
        self.image = image
        self.layer = image.platforms[0].layers[0]
        self.blob_path = f"/v2/{REPOSITORY}/blobs/{self.layer.digest}"
        for mirror in self.mirrors:
            server = self.warm[mirror.name] = mirror.start(
                self.root / f"{mirror.name}-warm", self.upstream
            )
            copy = skopeo_copy(self.reference(server), mirror.tls, self.root)
            print(f"{mirror.name}: warmed in {copy:.1f}s", file=sys.stderr)
        return image

    def reference(self, server: Process) -> str:
        return f"{LOOPBACK}:{server.port}/{REPOSITORY}:{TAG}"

    def fresh(
        self,
        mirror: Mirror,
        use: Callable[[Process], None],
        url: str | None = None,
        options: str = "",
    ) -> None:
        """Run *use* on a new server with an empty cache, then remove it.

        *url* and *options* are for dockmirror's upstream (see :meth:`Mirror.start`).
        """
        self._fresh += 1
        workdir = self.root / f"{mirror.name}-{self._fresh}"
        server = mirror.start(workdir, self.upstream, url, options)
        try:
            use(server)
        finally:
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    def record(self, row: str, server: str, value: float) -> None:
        self.runs.add(row, server, value)
        print(f"  {row} | {server}: {value:.4g}", file=sys.stderr)

    # --- the workloads, each on every server in the given order ------------------------

    def hit(self, order: list[Mirror]) -> None:
        size = self.layer.size
        for clients in self.args.clients:
            row = report.hit_row(clients)
            for mirror in order:
                server = self.warm[mirror.name]
                server.reset_peak()
                cpu = server.cpu_seconds()
                seconds = fetch(self.client(server, mirror.tls), self.blob_path, clients, size)
                cpu = server.cpu_seconds() - cpu
                self.record(row, mirror.name, clients * size / MIB / seconds)
                self.record(report.hit_cpu_row(clients), mirror.name, cpu * GIB / size / clients)
                if clients == max(self.args.clients):
                    self.record(report.hit_rss_row(clients), mirror.name, server.peak_mib())
                    if mirror.workers > 1:
                        peak = server.peak_process_mib()
                        self.record(report.hit_worker_rss_row(clients), mirror.name, peak)
            if self.nginx is not None:
                seconds = fetch(self.client(self.nginx, None), "/blob", clients, size)
                self.record(row, "nginx", clients * size / MIB / seconds)

    def cold(self, order: list[Mirror]) -> None:
        size = self.layer.size
        many = self.args.cold_clients
        for mirror in order:

            def one(server: Process, mirror: Mirror = mirror) -> None:
                cpu = server.cpu_seconds()
                seconds = fetch(self.client(server, mirror.tls), self.blob_path, 1, size)
                cpu = server.cpu_seconds() - cpu
                self.record(report.COLD_1, mirror.name, seconds)
                self.record(report.COLD_1_CPU, mirror.name, cpu * GIB / size)

            self.fresh(mirror, one)
        for mirror in order:

            def crowd(server: Process, mirror: Mirror = mirror) -> None:
                before = blob_fetches(self.upstream, self.layer.digest)
                cpu = server.cpu_seconds()
                seconds = fetch(self.client(server, mirror.tls), self.blob_path, many, size)
                cpu = server.cpu_seconds() - cpu
                after = blob_fetches(self.upstream, self.layer.digest)
                self.record(report.cold_row(many), mirror.name, seconds)
                self.record(report.cold_cpu_row(many), mirror.name, cpu * GIB / size / many)
                self.record(report.fetches_row(many), mirror.name, after - before)
                self.record(report.cold_rss_row(many), mirror.name, server.peak_mib())

            self.fresh(mirror, crowd)

    def heads(self, order: list[Mirror]) -> None:
        path = f"/v2/{REPOSITORY}/manifests/{TAG}"
        for mirror in order:
            client = self.client(self.warm[mirror.name], mirror.tls)
            rate = head_rate(client, path, self.args.heads, OCI_MANIFEST)
            self.record(report.HEADS, mirror.name, rate)

    def skopeo(self, order: list[Mirror]) -> None:
        direct = skopeo_copy(f"{self.upstream.host}/{REPOSITORY}:{TAG}", None, self.root)
        self.record(report.SKOPEO_DIRECT, "upstream", direct)
        for mirror in order:

            def cold(server: Process, mirror: Mirror = mirror) -> None:
                seconds = skopeo_copy(self.reference(server), mirror.tls, self.root)
                self.record(report.SKOPEO_COLD, mirror.name, seconds)

            self.fresh(mirror, cold)
        for mirror in order:
            server = self.warm[mirror.name]
            seconds = skopeo_copy(self.reference(server), mirror.tls, self.root)
            self.record(report.SKOPEO_WARM, mirror.name, seconds)

    def cluster(self, order: list[Mirror]) -> None:
        """Each kind of server as a cluster of ``--nodes``, cold then warm."""
        if self.backends is None:
            self.backends = cluster.Backends()
        for mirror in order:
            if mirror.name not in ("dockmirror", "distribution"):
                continue
            self._fresh += 1
            cluster.run(
                mirror,
                self.root / f"{mirror.name}-cluster-{self._fresh}",
                self.upstream,
                self.backends,
                self.blob_path,
                self.layer.size,
                self.args.nodes,
                self.args.cluster_clients,
                self.record,
            )

    def parallel(self, order: list[Mirror]) -> None:
        """A first pull of the layer over a capped link, direct and through 4 ranged parts;
        then on the uncapped link, through 4 parts and through one stream.

        The capped link is a relay that lets each TCP connection carry
        ``--cap-mib`` MiB/s, as a long link lets each connection carry what
        its window over the round trip allows.  Only this checkout's
        dockmirror, one process, runs it.
        """
        mirror = next(m for m in self.mirrors if m.name == mirror_name(1))
        size = self.layer.size
        measured: dict[str, float] = {}

        def pull(row: str, url: str | None, parts: int) -> None:
            def one(server: Process) -> None:
                client = self.client(server, mirror.tls)
                measured[row] = fetch(client, self.blob_path, 1, size)

            # Parts whatever the layer's size (--quick's is under the default minimum).
            options = f'parallel_parts = {parts}\nparallel_min_size = "1MiB"'
            self.fresh(mirror, one, url, options)
            self.record(row, mirror.name, measured[row])

        assert self.upstream.token_server is not None
        token = self.upstream.token_server.issue(None, [f"repository:{REPOSITORY}:pull"])
        with Relay(self.upstream.port) as capped:
            capped.faults.append(Fault(r"^GET /v2/.*/blobs/", rate=self.args.cap_mib * MIB))

            def direct() -> None:
                bearer = f"Authorization: Bearer {token}"
                seconds = fetch(Client(capped.url, None), self.blob_path, 1, size, "-H", bearer)
                measured[report.PARALLEL_DIRECT] = seconds
                self.record(report.PARALLEL_DIRECT, "upstream", seconds)

            steps = [
                direct,
                partial(pull, report.PARALLEL_CAPPED, capped.url, 4),
                partial(pull, report.PARALLEL_PARTS, None, 4),
                partial(pull, report.PARALLEL_STREAM, None, 1),
            ]
            # Alternate the order, so that no kind of run always goes first.
            if len(self.runs.get(report.PARALLEL_PARTS, mirror.name)) % 2:
                steps.reverse()
            for step in steps:
                step()
        capped_ratio = measured[report.PARALLEL_CAPPED] / measured[report.PARALLEL_DIRECT]
        self.record(report.PARALLEL_CAPPED_RATIO, mirror.name, capped_ratio)
        ratio = measured[report.PARALLEL_PARTS] / measured[report.PARALLEL_STREAM]
        self.record(report.PARALLEL_RATIO, mirror.name, ratio)

    def run(self) -> None:
        self.nginx = self.start_nginx()
        try:
            for repetition in range(self.args.repeat):
                # Rotate the order, so each server takes each place in turn.
                shift = repetition % len(self.mirrors)
                order = self.mirrors[shift:] + self.mirrors[:shift]
                print(f"repetition {repetition + 1}/{self.args.repeat}", file=sys.stderr)
                for workload in self.args.only:
                    getattr(self, workload)(order)
        finally:
            if self.nginx is not None:
                self.nginx.stop()

    def start_nginx(self) -> Process | None:
        """nginx serving dockmirror's cached file of the layer, over plain HTTP only."""
        if self.tls is not None or shutil.which("nginx") is None:
            return None
        server = self.warm[self.mirrors[0].name]
        algorithm, _, hexpart = self.layer.digest.partition(":")
        blob = server.workdir / "cache" / "blobs" / algorithm / hexpart[:2] / hexpart
        return start_nginx(self.root / "nginx", "/blob", blob)

    def stop(self) -> None:
        for server in self.warm.values():
            server.stop()
        if self.backends is not None:
            self.backends.stop()


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    started = time.monotonic()
    machine = report.machine()
    with tempfile.TemporaryDirectory(prefix="dockmirror-bench-") as tmp:
        root = Path(tmp)
        (root / "upstream").mkdir()
        with (
            TokenServer(root / "upstream") as tokens,
            Registry(root / "upstream", "token", token_server=tokens) as upstream,
        ):
            bench = Bench(root, args, upstream)
            try:
                bench.prepare()
                bench.run()
            finally:
                bench.stop()
    machine["load_average_after"] = report.load_average()
    settings = {
        "transport": "plain HTTP" if args.plain else "TLS",
        "layer_bytes": bench.layer.size,
        "repetitions": args.repeat,
        "hit_clients": args.clients,
        "cold_clients": args.cold_clients,
        "workers": args.workers,
        "heads": args.heads,
        "cluster": f"{args.nodes} nodes, {args.cluster_clients} clients",
        "cap_mib_per_connection": args.cap_mib,
        "seconds": round(time.monotonic() - started, 1),
    }
    names = [m.name for m in bench.mirrors]
    print(report.table(bench.runs, names, settings, machine))
    parallel = report.parallel_table(bench.runs, settings)
    if parallel:
        print(f"\n{parallel}")
    report.write_json(args.json, bench.runs, settings, machine)
    print(f"\nraw runs: {args.json}", file=sys.stderr)
    if report.chart(args.chart, bench.runs, names, args.clients, settings):
        print(f"chart: {args.chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
