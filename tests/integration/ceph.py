"""A real S3 store on loopback: Ceph's RADOS Gateway on a one-OSD memstore cluster.

One monitor, one OSD keeping objects in memory, and radosgw, with no manager
and no systemd; ready in a few seconds.  One store per test session; each
test that asks for ``s3`` gets a bucket of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .registries import LOOPBACK, ManagedProcess, free_port, subprocess_env

ACCESS_KEY = "TESTKEY"
SECRET_KEY = "TESTSECRET"
REGION = "us-east-1"
REQUIRED = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")

_CONF = """\
[global]
fsid = {fsid}
mon_host = [v2:{host}:{mon_port}]
public_addr = {host}
cluster_addr = {host}
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
ms_client_mode = crc
ms_mon_service_mode = crc
ms_mon_cluster_mode = crc
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
mon_data = {d}/mon/$id
osd_data = {d}/osd/$id
osd_objectstore = memstore
memstore_device_bytes = 4294967296
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 1
osd_pool_default_pgp_num = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_max_pg_per_osd = 1000
mon_warn_on_pool_no_redundancy = false
mon_data_avail_crit = 0
mon_data_avail_warn = 0
rgw_thread_pool_size = 64
ms_bind_port_min = 16800
ms_bind_port_max = 16900
osd_memory_target = 939524096
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
[client.rgw.a]
rgw_frontends = beast endpoint={host}:{rgw_port}
rgw_data = {d}/rgw
"""


class Gateway(ManagedProcess):
    """A radosgw of :meth:`CephS3.gateway`, with its plain and TLS ports."""

    port: int
    tls_port: int


@dataclass(frozen=True)
class S3Bucket:
    """Where a test's objects go, and the credentials to reach them."""

    endpoint: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def storage_table(self, **extra: object) -> dict[str, object]:
        """The ``[storage]`` table of a dockmirror configuration for this bucket."""
        return {
            "backend": "s3",
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "addressing": "path",
            **extra,
        }

    def client(self) -> object:
        """A botocore S3 client for the test's own checks."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )


class CephS3:
    """A monitor, a memstore OSD and radosgw, all under *directory*."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rgw_port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.rgw_port}"
        self.conf = directory / "ceph.conf"
        for sub in ("mon", "osd", "run", "log", "rgw"):
            (directory / sub).mkdir()
        mon_port = free_port()
        fsid = str(uuid.uuid4())
        self.conf.write_text(
            _CONF.format(
                fsid=fsid, host=LOOPBACK, mon_port=mon_port, rgw_port=self.rgw_port, d=directory
            )
        )
        self._env = subprocess_env(CEPH_CONF=str(self.conf))
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                  f"[v2:{LOOPBACK}:{mon_port}]", str(directory / "monmap"))  # fmt: skip
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(directory / "monmap"))
        self.processes: list[ManagedProcess] = []
        self._daemon("mon", ["ceph-mon", "-f", "-i", "a"], lambda: True)
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run("ceph", "osd", "new", osd_uuid).strip()
        (directory / "osd" / osd_id).mkdir()
        self._run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("osd", ["ceph-osd", "-f", "-i", osd_id], lambda: True)
        self._daemon("rgw", ["radosgw", "-f", "-n", "client.rgw.a"], self.endpoint + "/")
        self._run("radosgw-admin", "user", "create", "--uid=test", "--display-name=test",
                  f"--access-key={ACCESS_KEY}", f"--secret={SECRET_KEY}")  # fmt: skip

    def _run(self, *argv: str) -> str:
        done = subprocess.run(
            [argv[0], "-c", str(self.conf), *argv[1:]],
            capture_output=True,
            text=True,
            env=self._env,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def _daemon(self, name: str, argv: list[str], ready: object) -> None:
        process = ManagedProcess(
            [argv[0], "-c", str(self.conf), *argv[1:]],
            log_path=self.directory / "log" / f"{name}.out",
            cwd=self.directory,
            env=self._env,
        )
        self.processes.append(process)
        process.start(ready, timeout=90)  # type: ignore[arg-type]

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def gateway(self, workdir: Path, dns_name: str, certificate: Path, key: Path) -> Gateway:
        """Another radosgw on the same store (same users and buckets): plain HTTP on
        its ``port``, TLS with *certificate* on its ``tls_port``, and buckets
        addressed as virtual hosts of *dns_name* as well as by path.
        The caller stops it.
        """
        port, tls_port = free_port(), free_port()
        name = f"client.rgw.{uuid.uuid4().hex[:8]}"
        frontends = (
            f"beast endpoint={LOOPBACK}:{port} ssl_endpoint={LOOPBACK}:{tls_port}"
            f" ssl_certificate={certificate} ssl_private_key={key}"
        )
        (workdir / "rgw").mkdir(parents=True, exist_ok=True)
        process = Gateway(
            [
                "radosgw",
                "-c",
                str(self.conf),
                "-f",
                "-n",
                name,
                f"--rgw_frontends={frontends}",
                f"--rgw_dns_name={dns_name}",
                f"--rgw_data={workdir / 'rgw'}",
            ],  # fmt: skip
            log_path=workdir / "rgw.out",
            cwd=workdir,
            env=self._env,
        )
        process.port, process.tls_port = port, tls_port
        process.start(f"http://{LOOPBACK}:{port}/", timeout=90)
        return process

    def bucket(self) -> S3Bucket:
        """A new empty bucket."""
        bucket = S3Bucket(self.endpoint, f"t-{uuid.uuid4().hex[:16]}")
        bucket.client().create_bucket(Bucket=bucket.bucket)  # type: ignore[attr-defined]
        return bucket


@pytest.fixture(scope="session")
def ceph_s3() -> Iterator[CephS3]:
    """The session's S3 store (skipped, or failed in strict mode, without Ceph)."""
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"Ceph is not installed ({', '.join(missing)} missing): apt-get install"
            " ceph-mon ceph-osd radosgw ceph-common"
        )
    directory = Path(tempfile.mkdtemp(prefix="dockmirror-ceph-"))
    store = None
    try:
        store = CephS3(directory)
        yield store
    finally:
        if store is not None:
            store.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def s3(ceph_s3: CephS3) -> S3Bucket:
    """An empty bucket of this test's own."""
    return ceph_s3.bucket()
