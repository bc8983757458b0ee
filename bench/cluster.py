"""The cluster run (``--only cluster``): several nodes behind no balancer, clients spread over them.

dockmirror runs as N nodes sharing a PostgreSQL database (a server of the
run's own, from Debian's ``postgresql``) and an S3 bucket (Ceph's RADOS
Gateway, also the run's own), each with its own cache and cluster listener;
distribution runs as N proxies sharing one bucket of the same store (its
``s3`` storage driver, redirects off), which is how it scales out.  Each
repetition starts both groups with empty caches and a new bucket, sends the
clients at once, spread round robin over the nodes (cold), then again
(warm), and records the upstream GETs of the layer, the throughput of all
the clients together and their times to first byte.  Clients speak TLS to
the nodes unless the run is ``--plain``; node-to-node traffic is plain HTTP.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.servers import MIB, Mirror, Process, blob_fetches
from bench.workloads import Client
from tests.integration.ceph import REQUIRED, CephS3, S3Bucket
from tests.integration.postgres import PostgresServer, postgres_bin
from tests.integration.registries import LOOPBACK, Registry, free_port


def rows(nodes: int, clients: int, phase: str) -> dict[str, str]:
    where = f"{clients} {phase} clients over {nodes} nodes"
    return {
        "gets": f"cluster: upstream GETs of the layer, {where}",
        "throughput": f"cluster: throughput, {where} (MiB/s, all clients)",
        "first": f"cluster: median time to first byte, {where} (s)",
        "slowest": f"cluster: slowest time to first byte, {where} (s)",
        "failed": f"cluster: clients that did not get the whole layer, {where}",
    }


class Backends:
    """A PostgreSQL server and an S3 store for the run: a new database and bucket per group."""

    def __init__(self) -> None:
        if postgres_bin() is None:
            raise RuntimeError("the cluster run needs PostgreSQL (apt-get install postgresql)")
        missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(
                "the cluster run needs Ceph (apt-get install ceph-mon ceph-osd radosgw"
                f" ceph-common): {', '.join(missing)} missing"
            )
        # Not under the run's directory: as root, the server runs as another user.
        self.directory = Path(tempfile.mkdtemp(prefix="dockmirror-bench-postgres-"))
        os.chmod(self.directory, 0o755)
        self.server = PostgresServer(self.directory)
        self.server.start()
        self.store = CephS3(Path(tempfile.mkdtemp(prefix="dockmirror-bench-ceph-")))

    def create(self) -> str:
        return self.server.create_database()

    def bucket(self) -> S3Bucket:
        return self.store.bucket()

    def stop(self) -> None:
        self.store.stop()
        shutil.rmtree(self.store.directory, ignore_errors=True)
        self.server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _toml(table: dict[str, str]) -> str:
    return "".join(f'{key} = "{value}"\n' for key, value in table.items())


def start_group(
    mirror: Mirror, root: Path, upstream: Registry, nodes: int, backends: Backends
) -> list[Process]:
    """*nodes* servers of *mirror*'s kind, sharing a bucket (and for dockmirror, a database)."""
    url = backends.create()
    bucket = backends.bucket()
    storage = {
        "backend": "s3",
        "endpoint": bucket.endpoint,
        "bucket": bucket.bucket,
        "region": bucket.region,
        "access_key": bucket.access_key,
        "secret_key": bucket.secret_key,
    }
    group = []
    try:
        for n in range(nodes):
            port = free_port()
            cluster = {
                "database": url,
                "listen": f"tcp:{port}:interface={LOOPBACK}",
                "node_url": f"http://{LOOPBACK}:{port}",
            }
            extra = f"[cluster]\n{_toml(cluster)}[storage]\n{_toml(storage)}"
            group.append(mirror.start(root / f"node{n}", upstream, extra=extra, storage=bucket))
    except BaseException:
        for server in group:
            server.stop()
        raise
    return group


def crowd(clients: list[Client], path: str, size: int) -> tuple[float, list[float], int]:
    """Seconds until every client is done, the time to first byte of each that got the
    whole blob, and how many did not (a server's failure is a figure, not the run's end).
    """
    started = time.monotonic()
    curls = [
        subprocess.Popen(
            c.curl("-f", "-o", "/dev/null", "-w", "%{size_download} %{time_starttransfer}")
            + [c.base + path],
            stdout=subprocess.PIPE,
        )
        for c in clients
    ]
    answers = [c.communicate()[0].decode().split() for c in curls]
    elapsed = time.monotonic() - started
    whole = [float(a[1]) for a in answers if a and int(a[0]) == size]
    return elapsed, whole, len(answers) - len(whole)


def run(
    mirror: Mirror,
    root: Path,
    upstream: Registry,
    backends: Backends,
    path: str,
    size: int,
    nodes: int,
    clients: int,
    record: Callable[[str, str, float], None],
) -> None:
    """Cold then warm, on a new group of *nodes* servers of *mirror*; figures go to *record*."""
    group = start_group(mirror, root, upstream, nodes, backends)
    try:
        scheme = "https" if mirror.tls else "http"
        spread = [
            Client(f"{scheme}://{LOOPBACK}:{group[i % nodes].port}", mirror.tls)
            for i in range(clients)
        ]
        digest = path.rpartition("/")[2]
        for phase in ("cold", "warm"):
            names = rows(nodes, clients, phase)
            before = blob_fetches(upstream, digest)
            seconds, firsts, failed = crowd(spread, path, size)
            after = blob_fetches(upstream, digest)
            record(names["gets"], mirror.name, after - before)
            record(names["failed"], mirror.name, failed)
            record(names["throughput"], mirror.name, len(firsts) * size / MIB / seconds)
            if firsts:
                record(names["first"], mirror.name, statistics.median(firsts))
                record(names["slowest"], mirror.name, max(firsts))
    finally:
        for server in group:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
