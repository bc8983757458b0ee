"""The cluster run (``--only cluster``): several nodes behind no balancer, clients spread over them.

dockmirror runs as N nodes sharing a PostgreSQL database (a server of the
run's own, from Debian's ``postgresql``), each with its own cache and cluster
listener; distribution runs as N proxies sharing one storage directory,
which is how it scales out.  Each repetition starts both groups with empty
caches, sends the clients at once, spread round robin over the nodes (cold),
then again (warm), and records the upstream GETs of the layer, the
throughput of all the clients together and their times to first byte.
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

from bench.servers import MIB, Mirror, Process
from bench.workloads import Client
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


class Database:
    """A PostgreSQL server for the run, with a new database for each group of nodes."""

    def __init__(self) -> None:
        if postgres_bin() is None:
            raise RuntimeError("the cluster run needs PostgreSQL (apt-get install postgresql)")
        # Not under the run's directory: as root, the server runs as another user.
        self.directory = Path(tempfile.mkdtemp(prefix="dockmirror-bench-postgres-"))
        os.chmod(self.directory, 0o755)
        self.server = PostgresServer(self.directory)
        self.server.start()

    def create(self) -> str:
        return self.server.create_database()

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_group(
    mirror: Mirror, root: Path, upstream: Registry, nodes: int, database: Database
) -> list[Process]:
    """*nodes* servers of *mirror*'s kind, sharing a database or a storage directory."""
    url = database.create()
    group = []
    try:
        for n in range(nodes):
            port = free_port()
            extra = (
                f'[cluster]\ndatabase = "{url}"\nlisten = "tcp:{port}:interface={LOOPBACK}"\n'
                f'node_url = "http://{LOOPBACK}:{port}"\n'
            )
            group.append(
                mirror.start(root / f"node{n}", upstream, extra=extra, storage=root / "storage")
            )
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
    database: Database,
    path: str,
    size: int,
    nodes: int,
    clients: int,
    record: Callable[[str, str, float], None],
) -> None:
    """Cold then warm, on a new group of *nodes* servers of *mirror*; figures go to *record*."""
    group = start_group(mirror, root, upstream, nodes, database)
    try:
        scheme = "https" if mirror.tls else "http"
        spread = [
            Client(f"{scheme}://{LOOPBACK}:{group[i % nodes].port}", mirror.tls)
            for i in range(clients)
        ]
        digest = path.rpartition("/")[2]
        for phase in ("cold", "warm"):
            names = rows(nodes, clients, phase)
            before = upstream.count_requests("GET", f"/blobs/{digest}")
            seconds, firsts, failed = crowd(spread, path, size)
            after = upstream.count_requests("GET", f"/blobs/{digest}")
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
