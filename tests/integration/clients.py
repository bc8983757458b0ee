"""Real container clients, dockerd, podman and containerd/ctr, run against dockmirror.

Every client process runs as root in a private mount namespace (``unshare
--mount``) prepared by a :class:`Sandbox`:

- its ``/etc/hosts`` maps the mirror's name to ``::1`` and every public
  registry name to ``127.0.0.1``, and its ``resolv.conf`` names only
  ``127.0.0.1``: a client that falls back to "the real registry" gets a
  refused connection on loopback, and no DNS query or packet leaves the
  machine;
- ``/run`` and ``/opt`` (and podman's ``/var/lib/containers``) are private
  tmpfs, and each client's own ``/etc`` directory (``/etc/docker``,
  ``/etc/containers``) is a bind mount of a test directory, so nothing
  outside the test's directories changes.

The mirror is reached over TLS on ``::1`` by name: dockerd treats
127.0.0.0/8 as an insecure registry (no certificate check, plain-HTTP
fallback), so only ``::1`` proves that clients verify the certificate.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .registries import ManagedProcess, subprocess_env

MIRROR_NAME = "mirror.test"
#: Public registry names a client could fall back to; all point at loopback.
PUBLIC_REGISTRIES = (
    "registry-1.docker.io",
    "index.docker.io",
    "auth.docker.io",
    "docker.io",
    "production.cloudflare.docker.com",
    "ghcr.io",
    "quay.io",
    "gcr.io",
    "registry.k8s.io",
)
#: The Debian package providing each program.
PACKAGES = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "podman": "podman",
    "containerd": "containerd",
    "ctr": "containerd",
}
COMMAND_TIMEOUT = 120.0


def unavailable(*programs: str) -> str | None:
    """Why client tests using ``programs`` cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "client tests need root: they run daemons in private mount namespaces"
    if not _can_unshare():
        return "client tests need mount namespaces (unshare --mount failed)"
    missing = sorted({PACKAGES[p] for p in programs if shutil.which(p) is None})
    if missing:
        return f"client tests need the Debian packages {' '.join(missing)}"
    return None


@functools.cache
def _can_unshare() -> bool:
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return False
    return result.returncode == 0


# --- TLS -------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTLS:
    """A test CA and a server certificate it signed, as PEM files."""

    ca: Path
    certificate: Path
    key: Path


def make_server_tls(directory: Path, name: str) -> ServerTLS:
    """A CA and a certificate for ``name``, localhost, 127.0.0.1 and ::1."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dockmirror test CA")])
    ca = (
        _certificate_builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    alternative_names = [
        x509.DNSName(name),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    certificate = (
        _certificate_builder(subject, ca_name, key.public_key(), now)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    tls = ServerTLS(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tls.key.chmod(0o600)
    return tls


def _certificate_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
    )


def tls_endpoint(port: int, interface: str, tls: ServerTLS) -> str:
    """A Twisted ``ssl:`` server endpoint string (colons in values escaped)."""
    return ":".join(
        [
            "ssl",
            str(port),
            f"interface={_endpoint_escape(interface)}",
            f"privateKey={_endpoint_escape(str(tls.key))}",
            f"certKey={_endpoint_escape(str(tls.certificate))}",
        ]
    )


def _endpoint_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def free_port_ipv6() -> int:
    """A TCP port on ::1 that is free right now."""
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        return int(sock.getsockname()[1])


# --- the private namespace ---------------------------------------------------


class Sandbox:
    """How client processes are started: in a private mount namespace.

    The namespace lives exactly as long as the process started in it, so
    its mounts need no cleanup.
    """

    def __init__(self, workdir: Path, mirror_name: str = MIRROR_NAME) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        hosts = workdir / "hosts"
        hosts.write_text(
            "127.0.0.1 localhost\n"
            "::1 localhost\n"
            f"::1 {mirror_name}\n"
            f"127.0.0.1 {' '.join(PUBLIC_REGISTRIES)}\n"
        )
        resolv = workdir / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        nsswitch = workdir / "nsswitch.conf"
        nsswitch.write_text("hosts: files dns\n")
        self.binds = {
            "/etc/hosts": hosts,
            "/etc/resolv.conf": resolv,
            "/etc/nsswitch.conf": nsswitch,
        }

    def wrap(
        self,
        argv: Sequence[str],
        binds: Mapping[str, Path] | None = None,
        private_dirs: Sequence[str] = (),
    ) -> list[str]:
        """``argv`` run in a fresh namespace.

        ``binds`` (target: source) are added to the sandbox's own, and each of
        ``private_dirs`` gets an empty tmpfs, as /run and /opt always do (a missing
        mount point is made, empty, on the real filesystem).
        """
        lines = ["set -e"]
        for directory in ("/run", "/opt", *private_dirs):
            lines.append(f"mkdir -p {shlex.quote(directory)}")
            lines.append(f"mount -t tmpfs sandbox {shlex.quote(directory)}")
        lines.extend(
            f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}"
            for target, source in {**self.binds, **(binds or {})}.items()
        )
        lines.append('exec "$@"')
        script = "\n".join(lines)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        binds: Mapping[str, Path] | None = None,
        private_dirs: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> Result:
        """Run a client command to completion; the caller checks the result."""
        completed = subprocess.run(
            self.wrap(argv, binds, private_dirs),
            env=dict(env) if env is not None else subprocess_env(),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Result(list(argv), completed.returncode, completed.stdout, completed.stderr)


class ClientError(AssertionError):
    """A client command failed where it had to succeed."""


@dataclass(frozen=True)
class Result:
    """What a finished client command did."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self) -> Result:
        """This result, or ClientError with the output if the command failed."""
        if self.returncode != 0:
            raise ClientError(
                f"{shlex.join(self.argv)} exited with {self.returncode}:\n{self.output}"
            )
        return self


def _socket_accepts(path: Path) -> bool:
    """Whether a unix socket at ``path`` accepts connections."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


# --- docker --------------------------------------------------------------------


class Docker:
    """A private dockerd and the docker CLI pointed at it.

    ``/etc/docker`` holds ``certs.d/HOST:PORT/ca.crt`` for each of
    ``mirror_hosts`` and a daemon.json naming ``registry_mirrors``.
    """

    def __init__(
        self,
        workdir: Path,
        sandbox: Sandbox,
        ca: Path,
        mirror_hosts: Sequence[str],
        registry_mirrors: Sequence[str],
    ) -> None:
        self.sandbox = sandbox
        self.etc = workdir / "etc-docker"
        for host in mirror_hosts:
            certs = self.etc / "certs.d" / host
            certs.mkdir(parents=True)
            shutil.copy(ca, certs / "ca.crt")
        self.daemon_json = self.etc / "daemon.json"
        self.daemon_json.write_text(
            json.dumps({"registry-mirrors": list(registry_mirrors)}, indent=2) + "\n"
        )
        self.data_root = workdir / "data"
        self.exec_root = workdir / "exec"
        self.socket = workdir / "docker.sock"
        self.client_config = workdir / "client-config"
        self.client_config.mkdir()
        argv = [
            "dockerd",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--storage-driver=vfs",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--host=unix://{self.socket}",
            f"--pidfile={workdir / 'docker.pid'}",
            f"--config-file={self.daemon_json}",
        ]
        self._process = ManagedProcess(
            sandbox.wrap(argv, {"/etc/docker": self.etc}),
            log_path=workdir / "dockerd.log",
            cwd=workdir,
        )

    def start(self) -> None:
        self._process.start(lambda: _socket_accepts(self.socket), timeout=60.0)

    def stop(self) -> None:
        """Stop the daemon (and the containerd it runs) and remove its data."""
        self._process.stop(timeout=30.0)
        for directory in (self.data_root, self.exec_root):
            shutil.rmtree(directory, ignore_errors=True)

    def log_text(self) -> str:
        return self._process.log_text()

    def cli(self, *args: str, input: str | None = None) -> Result:
        """Run ``docker ARGS`` against this daemon, with a private client config."""
        env = subprocess_env(
            DOCKER_HOST=f"unix://{self.socket}", DOCKER_CONFIG=str(self.client_config)
        )
        return self.sandbox.run(
            ["docker", *args], binds={"/etc/docker": self.etc}, env=env, input=input
        )

    def pull(self, reference: str) -> Result:
        return self.cli("pull", reference)

    def login(self, registry: str, username: str, password: str) -> Result:
        """``docker login`` (the daemon checks the credentials against the registry)."""
        return self.cli(
            "login", "--username", username, "--password-stdin", registry, input=password
        )

    def repo_digests(self, reference: str) -> list[str]:
        """The pulled image's ``RepoDigests`` (``name@digest`` for each repository)."""
        result = self.cli("image", "inspect", "--format", "{{json .RepoDigests}}", reference)
        return list(json.loads(result.check().stdout))

    def reset(self) -> None:
        """Forget every image and every stored login."""
        ids = self.cli("image", "ls", "--all", "--quiet").check().stdout.split()
        if ids:
            self.cli("image", "rm", "--force", *sorted(set(ids))).check()
        (self.client_config / "config.json").unlink(missing_ok=True)


# --- podman --------------------------------------------------------------------


class Podman:
    """podman with private storage and a private ``/etc/containers``.

    Pulls pass ``--cert-dir`` naming a directory that holds only ``ca.crt``:
    podman refuses a directory with a stray key in it.
    """

    def __init__(self, workdir: Path, sandbox: Sandbox, ca: Path, registries_conf: str) -> None:
        self.workdir = workdir
        self.sandbox = sandbox
        self.etc = workdir / "etc-containers"
        self.etc.mkdir()
        (self.etc / "registries.conf").write_text(registries_conf)
        (self.etc / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )
        self.cert_dir = workdir / "certs"
        self.cert_dir.mkdir()
        shutil.copy(ca, self.cert_dir / "ca.crt")
        self.storage = workdir / "storage"
        # podman refuses a runroot path longer than 50 characters, which pytest's
        # temporary directories grow past once a machine made a thousand of them.
        self.runroot = Path(tempfile.mkdtemp(prefix="podman-run-"))
        self.home = workdir / "home"
        self.home.mkdir()
        self.auth_file = workdir / "auth.json"
        self.auth_file.write_text('{"auths": {}}\n')

    def run(self, *args: str) -> Result:
        """Run ``podman ARGS`` with private storage, home and auth file."""
        argv = [
            "podman",
            f"--root={self.storage / 'root'}",
            f"--runroot={self.runroot}",
            f"--tmpdir={self.storage / 'tmp'}",
            "--storage-driver=vfs",
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
            *args,
        ]
        env = subprocess_env(
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            REGISTRY_AUTH_FILE=str(self.auth_file),
        )
        # Root's podman keeps a blob-info cache in /var/lib/containers/cache.
        return self.sandbox.run(
            argv,
            binds={"/etc/containers": self.etc},
            private_dirs=["/var/lib/containers"],
            env=env,
        )

    def pull(self, reference: str, *options: str) -> Result:
        return self.run("pull", f"--cert-dir={self.cert_dir}", *options, reference)

    def digest(self, reference: str) -> str:
        """The digest the image was pulled by (the index's, for a multi-arch image)."""
        result = self.run("image", "inspect", "--format", "{{.Digest}}", reference)
        return result.check().stdout.strip()

    def reset(self) -> None:
        """Forget every image."""
        self.run("rmi", "--all", "--force").check()

    def remove_storage(self) -> None:
        shutil.rmtree(self.storage, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


def podman_registries_conf(mirror_host: str) -> str:
    """A registries.conf sending docker.io and ghcr.io to ``mirror_host`` (``name:port``)."""
    return (
        "[[registry]]\n"
        'prefix = "docker.io"\n'
        f'location = "{mirror_host}"\n'
        "\n"
        "[[registry]]\n"
        'prefix = "ghcr.io"\n'
        f'location = "{mirror_host}/ghcr.io"\n'
    )


# --- containerd ----------------------------------------------------------------


class Containerd:
    """A private containerd (CRI plugin disabled) and ``ctr`` pointed at it."""

    def __init__(self, workdir: Path, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.socket = workdir / "containerd.sock"
        config = workdir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "\n"
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            "\n"
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{workdir / "opt"}"\n'
        )
        self._process = ManagedProcess(
            sandbox.wrap(["containerd", f"--config={config}"]),
            log_path=workdir / "containerd.log",
            cwd=workdir,
        )

    def start(self) -> None:
        self._process.start(lambda: _socket_accepts(self.socket), timeout=30.0)

    def stop(self) -> None:
        self._process.stop()
        for directory in (self.root, self.state):
            shutil.rmtree(directory, ignore_errors=True)

    def ctr(self, *args: str) -> Result:
        """Run ``ctr ARGS``; ctr itself makes the registry requests."""
        return self.sandbox.run(["ctr", f"--address={self.socket}", *args])

    def pull(self, reference: str, hosts_dir: Path, *options: str) -> Result:
        """``ctr images pull``, with registry hosts configured in ``hosts_dir``."""
        return self.ctr(
            "images",
            "pull",
            "--snapshotter=native",
            f"--hosts-dir={hosts_dir}",
            *options,
            reference,
        )

    def digest(self, reference: str) -> str:
        """The digest ``reference`` points at in the image store."""
        listing = self.ctr("images", "ls").check().stdout.splitlines()
        for line in listing[1:]:
            name, _media_type, digest, *_ = line.split()
            if name == reference:
                return digest
        raise ClientError(f"{reference} is not among the images:\n" + "\n".join(listing))

    def reset(self) -> None:
        """Forget every image (their content is garbage-collected)."""
        names = self.ctr("images", "ls", "--quiet").check().stdout.split()
        if names:
            self.ctr("images", "rm", "--sync", *names).check()


def containerd_hosts_dir(directory: Path, mirror_url: str, ca: Path) -> Path:
    """``DIR/REGISTRY/hosts.toml`` for docker.io and ghcr.io, trying ``mirror_url`` first."""
    servers = {"docker.io": "https://registry-1.docker.io", "ghcr.io": "https://ghcr.io"}
    for registry, server in servers.items():
        (directory / registry).mkdir(parents=True)
        (directory / registry / "hosts.toml").write_text(
            f'server = "{server}"\n'
            "\n"
            f'[host."{mirror_url}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            f'  ca = "{ca}"\n'
        )
    return directory
