"""The processes a benchmark runs: the mirrors side by side, and nginx.

Every server listens on 127.0.0.1 only, runs in its own process group and is
killed as a group.  The upstream (distribution with token auth) comes from
the integration tests' :mod:`tests.integration.registries`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.integration.ceph import S3Bucket
from tests.integration.clients import ServerTLS, tls_endpoint
from tests.integration.registries import LOOPBACK, Registry, free_port, subprocess_env

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


class Process:
    """A server in its own process group, waited on until it accepts connections."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        port: int,
        env: dict[str, str],
        workers: int = 1,
    ) -> None:
        self.name = name
        self.port = port
        self.workdir = workdir
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
        deadline = time.monotonic() + 60
        while not _accepts(port) or not self._serving(workers):
            if time.monotonic() > deadline or self.popen.poll() is not None:
                self.stop()
                raise RuntimeError(f"{name} did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def _serving(self, workers: int) -> bool:
        """With workers, whether they all adopted the listener the supervisor bound."""
        if workers == 1:
            return True
        started = self.log.read_text(errors="replace").count(f" starting on {self.port}")
        return started > workers  # the supervisor's line, then each worker's

    def pids(self) -> list[int]:
        """The server's process and its children (dockmirror's workers)."""
        pids = [self.popen.pid]
        for pid in pids:
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except FileNotFoundError:
                continue
            pids.extend(int(child) for child in children)
        return pids

    def memory(self, field: str, pid: int | None = None) -> int:
        """A memory figure of a process (``VmRSS``, ``VmHWM`` for the peak), in bytes."""
        pid = self.popen.pid if pid is None else pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field}")

    def cpu_seconds(self) -> float:
        """User and system CPU time the server used so far, all its processes and threads."""
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def reset_peak(self) -> None:
        """Start ``VmHWM`` again from the current RSS, in every process."""
        for pid in self.pids():
            Path(f"/proc/{pid}/clear_refs").write_text("5")

    def peak_mib(self) -> float:
        """The peak RSS of the whole server: the sum of its processes' peaks."""
        return sum(self.memory("VmHWM", pid) for pid in self.pids()) / MIB

    def peak_process_mib(self) -> float:
        """The largest peak RSS of one of its processes (one worker, with workers)."""
        return max(self.memory("VmHWM", pid) for pid in self.pids()) / MIB

    def stop(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Mirror:
    """How to start one kind of mirror, over TLS with *tls* or plain HTTP without."""

    name: str
    kind: str  # "dockmirror" or "distribution"
    tls: ServerTLS | None
    #: For dockmirror: the checkout to run it from (its ``.venv`` if it has one).
    checkout: Path = REPO_ROOT
    #: For dockmirror: ``[server] workers``.
    workers: int = 1

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def start(
        self,
        workdir: Path,
        upstream: Registry,
        url: str | None = None,
        options: str = "",
        extra: str = "",
        storage: Path | S3Bucket | None = None,
    ) -> Process:
        """Start it on *upstream*, or on *url* in front of it; *options* go in dockmirror's
        ``[upstreams.hub]`` table, *extra* (TOML tables) after it; *storage* is the
        directory or the S3 bucket distribution keeps blobs in (by default, a
        directory in *workdir*)."""
        workdir.mkdir(parents=True)
        port = free_port()
        if self.kind == "dockmirror":
            argv, env = self._dockmirror(workdir, url or upstream.url, port, options, extra)
        else:
            storage = storage or workdir / "storage"
            argv, env = self._distribution(workdir, upstream, port, storage), subprocess_env()
            # Its AWS SDK cannot add a CA bundle to its own transport, and panics.
            env.pop("AWS_CA_BUNDLE", None)
        return Process(self.name, argv, workdir, port, env, self.workers)

    def _dockmirror(
        self, workdir: Path, upstream_url: str, port: int, options: str, extra: str
    ) -> tuple[list[str], dict[str, str]]:
        listen = (
            tls_endpoint(port, LOOPBACK, self.tls)
            if self.tls
            else f"tcp:{port}:interface={LOOPBACK}"
        )
        venv = self.checkout / ".venv" / "bin"
        python = venv / "python" if venv.is_dir() else Path(sys.executable)
        twistd = (str(python), str(python.with_name("twistd")))
        url = f"{self.scheme}://{LOOPBACK}:{port}"
        argv = dockmirror_argv(workdir, upstream_url, [listen], url, self.workers, options, extra)
        env = subprocess_env(
            PYTHONPATH=os.pathsep.join(
                filter(None, [str(self.checkout), os.environ.get("PYTHONPATH")])
            )
        )
        return [*twistd, *argv], env

    def _distribution(
        self, workdir: Path, upstream: Registry, port: int, storage: Path | S3Bucket
    ) -> list[str]:
        http: dict[str, object] = {"addr": f"{LOOPBACK}:{port}", "secret": "bench"}
        if self.tls:
            http["tls"] = {"certificate": str(self.tls.certificate), "key": str(self.tls.key)}
        config = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": _distribution_storage(storage),
            "http": http,
            "proxy": {"remoteurl": upstream.url},
        }
        path = workdir / "config.yml"
        path.write_text(json.dumps(config))
        return ["docker-registry", "serve", str(path)]


def _distribution_storage(storage: Path | S3Bucket) -> dict[str, object]:
    """distribution's ``storage``: a directory, or a bucket it streams from (no redirects)."""
    if isinstance(storage, Path):
        return {"filesystem": {"rootdirectory": str(storage)}}
    s3 = {
        "accesskey": storage.access_key,
        "secretkey": storage.secret_key,
        "region": storage.region,
        "regionendpoint": storage.endpoint,
        "bucket": storage.bucket,
        "secure": storage.endpoint.startswith("https:"),
        "v4auth": True,
    }
    return {"s3": s3, "redirect": {"disable": True}}


def dockmirror_argv(
    workdir: Path,
    upstream_url: str,
    listen: list[str],
    public_url: str,
    workers: int = 1,
    options: str = "",
    extra: str = "",
) -> list[str]:
    """twistd's arguments for dockmirror with its cache in *workdir*, pulling from *upstream_url*.

    *options* are more lines of its ``[upstreams.hub]`` table, *extra* more tables.
    """
    config = workdir / "dockmirror.toml"
    config.write_text(
        f"""
[server]
listen = {json.dumps(listen)}
public_url = "{public_url}"
workers = {workers}
[auth]
database = "{workdir}/keys.sqlite"
[cache]
directory = "{workdir}/cache"
[upstreams.hub]
plugin = "registry"
url = "{upstream_url}"
default = true
{options}
{extra}"""
    )
    return ["-n", "--pidfile=", "dockmirror", "--config", str(config)]


def start_dockmirror(
    workdir: Path, upstream: Registry, tls_listen: str | None = None, twistd: tuple[str, ...] = ()
) -> Process:
    """dockmirror on a plain port (:attr:`Process.port`), plus an optional TLS listener.

    *twistd* replaces the command that runs twistd.
    """
    port = free_port()
    listen = [f"tcp:{port}:interface={LOOPBACK}", *filter(None, [tls_listen])]
    twistd = twistd or (sys.executable, str(Path(sys.executable).with_name("twistd")))
    public_url = f"http://{LOOPBACK}:{port}"
    argv = [*twistd, *dockmirror_argv(workdir, upstream.url, listen, public_url)]
    env = subprocess_env(PYTHONPATH=str(REPO_ROOT))
    return Process("dockmirror", argv, workdir, port, env)


def start_nginx(workdir: Path, path: str, blob: Path) -> Process:
    """nginx (one process, ``sendfile on``) serving the file *blob* at *path*."""
    workdir.mkdir(parents=True)
    port = free_port()
    temp = {name: workdir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    {"".join(f"{name}_temp_path {p};" for name, p in temp.items())}
    server {{
        listen {LOOPBACK}:{port};
        location = {path} {{
            alias {blob};
            default_type application/octet-stream;
        }}
    }}
}}
"""
    )
    argv = ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    return Process("nginx", argv, workdir, port, subprocess_env())


def blob_fetches(upstream: Registry, digest: str) -> int:
    """The GETs of blob *digest* that *upstream* answered with its bytes.

    A GET refused for want of a token carries none: it is the challenge a
    client meets on its first request, and which node of a cluster meets it
    depends on which one first asks the upstream anything.
    """
    return sum(
        1
        for request in upstream.requests()
        if request.method == "GET"
        and f"/blobs/{digest}" in request.uri
        and request.status in (200, 206)
    )
