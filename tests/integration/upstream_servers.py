"""Small loopback servers standing in front of, or in place of, an upstream registry.

- :class:`Listener` accepts TCP connections and counts them: an "evil" host
  that must never hear from the mirror.
- :class:`Relay` passes requests on to a real registry, except where a
  ``behaviour`` for the repository says otherwise (redirect, cut a body...),
  and records what it received.  It forwards no ``Range`` header: it
  answers a ranged GET with the whole body, as registries that ignore
  ``Range`` do.
- :class:`TLSRegistry` is a real registry serving TLS with a certificate from
  a test CA (:func:`make_pki`), optionally requiring client certificates.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from .registries import LOOPBACK, ManagedProcess, Registry, _Running, free_port

OCI_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX_TYPE = "application/vnd.oci.image.index.v1+json"

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Listener(_Running):
    """Accepts connections on 127.0.0.1 and counts them; sends nothing."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind((LOOPBACK, 0))
        self._socket.listen(16)
        self._socket.settimeout(0.2)
        self.port = int(self._socket.getsockname()[1])
        self.connections = 0
        self._running = False
        self._thread = threading.Thread(target=self._serve, name="listener", daemon=True)

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def _serve(self) -> None:
        while self._running:
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            connection.close()

    def stop(self) -> None:
        self._running = False
        self._thread.join()
        self._socket.close()


@dataclass(frozen=True)
class Received:
    """One request a :class:`Relay` received."""

    method: str
    path: str
    authorization: str | None
    range: str | None = None


#: A behaviour answers a request itself (returning True) or lets it pass on.
Behaviour = Callable[[BaseHTTPRequestHandler], bool]


class Relay(_Running):
    """An HTTP server on 127.0.0.1 that forwards GET and HEAD to *upstream*.

    ``behaviours`` maps a repository prefix (``evil/``) to a behaviour tried
    first for requests under ``/v2/<prefix>``; ``basic`` makes the relay ask
    for those Basic credentials itself.
    """

    def __init__(
        self,
        upstream: str,
        behaviours: dict[str, Behaviour] | None = None,
        basic: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.behaviours = dict(behaviours or {})
        self.basic = basic
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((LOOPBACK, 0), _relay_handler(self))
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()

    def count(self, path_part: str) -> int:
        with self._lock:
            return sum(1 for r in self.received if path_part in r.path)

    def record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)


def _relay_handler(relay: Relay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._handle()

        def do_HEAD(self) -> None:
            self._handle()

        def _handle(self) -> None:
            authorization = self.headers.get("Authorization")
            relay.record(
                Received(self.command, self.path, authorization, self.headers.get("Range"))
            )
            if relay.basic is not None and authorization != relay.basic:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="relay"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            for prefix, behaviour in relay.behaviours.items():
                if self.path.startswith(f"/v2/{prefix}") and behaviour(self):
                    return
            self._forward()

        def _forward(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() == "accept"}
            request = urllib.request.Request(
                relay.upstream + self.path, headers=headers, method=self.command
            )
            try:
                response = _opener.open(request, timeout=30)
            except urllib.error.HTTPError as e:
                response = e
            with response:
                body = response.read()
                length = response.headers["Content-Length"] if self.command == "HEAD" else None
                self.send_response(response.status)
                for name, value in response.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", length or str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Requests are recorded on the relay instead."""

    return Handler


def redirect(location: Callable[[BaseHTTPRequestHandler], str], status: int = 302) -> Behaviour:
    """A behaviour answering with a redirect to ``location(request)``."""

    def behave(request: BaseHTTPRequestHandler) -> bool:
        request.send_response(status)
        request.send_header("Location", location(request))
        request.send_header("Content-Length", "0")
        request.end_headers()
        return True

    return behave


# --- TLS ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    """A CA and certificates it signed (PEM files), made with the openssl command."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _key(directory: Path, name: str) -> str:
    _openssl(
        directory,
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        f"{name}.key",
    )
    return f"{name}.key"


def make_pki(
    directory: Path, name: str = "upstream test CA", names: str = "IP:127.0.0.1,DNS:localhost"
) -> PKI:
    """A CA, a server certificate for *names* (subjectAltName), and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key(directory, "ca")
    _openssl(
        directory,
        "req",
        "-x509",
        "-new",
        "-key",
        ca_key,
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )
    for kind, extensions in (
        ("server", f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        key = _key(directory, kind)
        (directory / f"{kind}.ext").write_text("basicConstraints=CA:FALSE\n" + extensions)
        _openssl(
            directory,
            "req",
            "-new",
            "-key",
            key,
            "-out",
            f"{kind}.csr",
            "-subj",
            f"/CN=dockmirror {kind}",
        )
        _openssl(
            directory,
            "x509",
            "-req",
            "-in",
            f"{kind}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            f"{kind}.pem",
            "-days",
            "2",
            "-extfile",
            f"{kind}.ext",
        )
    return PKI(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


class TLSRegistry(Registry):
    """A ``docker-registry`` serving TLS with *pki*'s server certificate.

    With ``client_cas``, it requires a client certificate signed by one of
    them (``http.tls.clientcas``).  ``storage`` shares another registry's
    storage, so images pushed there are served here too.
    """

    def __init__(
        self,
        workdir: Path,
        pki: PKI,
        *,
        client_cas: tuple[Path, ...] = (),
        storage: Path | None = None,
    ) -> None:
        self._pki = pki
        self._client_cas = client_cas
        self._shared_storage = storage
        super().__init__(workdir)

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def start(self) -> None:
        self._process.start(lambda: _port_open(self.port))

    def _config(self, workdir: Path) -> dict[str, object]:
        config = super()._config(workdir)
        if self._shared_storage is not None:
            config["storage"] = {"filesystem": {"rootdirectory": str(self._shared_storage)}}
        http = config["http"]
        assert isinstance(http, dict)
        tls: dict[str, object] = {
            "certificate": str(self._pki.server_cert),
            "key": str(self._pki.server_key),
        }
        if self._client_cas:
            tls["clientcas"] = [str(ca) for ca in self._client_cas]
        http["tls"] = tls
        return config


# --- nginx -------------------------------------------------------------------------

_NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {loopback}:{port}{ssl};
{server}
    }}
}}
"""


def nginx_binary() -> str | None:
    """Debian's nginx, if installed."""
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found if Path(found).exists() else None


class Nginx(_Running):
    """nginx on 127.0.0.1 with one ``server`` of *server* (its directives), in *workdir*.

    With ``ssl``, the listener is TLS (the directives give the certificate).
    """

    def __init__(self, workdir: Path, server: str, ssl: bool = False) -> None:
        binary = nginx_binary()
        assert binary is not None
        self.port = free_port()
        self.workdir = workdir
        conf = workdir / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(
                prefix=workdir,
                loopback=LOOPBACK,
                port=self.port,
                ssl=" ssl" if ssl else "",
                server=server,
            )
        )
        self._process = ManagedProcess(
            [binary, "-e", "stderr", "-p", str(workdir), "-c", str(conf)],
            log_path=workdir / "nginx.log",
            cwd=workdir,
        )

    def start(self) -> None:
        self._process.start(lambda: _port_open(self.port))

    def stop(self) -> None:
        self._process.stop()


# --- an HTTP proxy -------------------------------------------------------------------


class Tinyproxy(_Running):
    """Debian's ``tinyproxy`` on 127.0.0.1, in the foreground, with its own config and log.

    ``CONNECT`` is allowed to *connect_ports* only; with *credentials* the
    proxy asks for Basic authentication (407 without it).
    """

    def __init__(
        self,
        workdir: Path,
        connect_ports: tuple[int, ...],
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.log_path = workdir / "tinyproxy.log"
        lines = [
            f"Port {self.port}",
            f"Listen {LOOPBACK}",
            "Timeout 60",
            f'LogFile "{self.log_path}"',
            "LogLevel Connect",
            "MaxClients 50",
            f"Allow {LOOPBACK}",
            *(f"ConnectPort {port}" for port in connect_ports),
        ]
        if credentials is not None:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        config = workdir / "tinyproxy.conf"
        config.write_text("\n".join(lines) + "\n")
        self._process = ManagedProcess(
            ["tinyproxy", "-d", "-c", str(config)], log_path=workdir / "stdout.log", cwd=workdir
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        self._process.start(lambda: _port_open(self.port))

    def stop(self) -> None:
        self._process.stop()

    def connects(self, target: str) -> int:
        """``CONNECT`` requests for *target* (``host:port``) logged so far."""
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text().count(f": CONNECT {target} HTTP/1.1")


_REFERRERS_PATH = re.compile(r"/v2/(.+)/referrers/(sha256:[0-9a-f]{64})")


def referrers_api(registry_url: str) -> Behaviour:
    """A test double of the OCI 1.1 referrers API, for a registry without one.

    ``GET /v2/<name>/referrers/<digest>`` is answered as the distribution
    spec says, from what the registry really holds: every tagged manifest of
    the repository whose ``subject`` is the digest, as an image index, with
    ``artifactType`` filtering (and ``OCI-Filters-Applied``).
    """

    def get(url: str, accept: str | None = None) -> tuple[bytes, str]:
        request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        with _opener.open(request, timeout=30) as response:
            return response.read(), response.headers["Content-Type"]

    def behave(request: BaseHTTPRequestHandler) -> bool:
        path, _, query = request.path.partition("?")
        match = _REFERRERS_PATH.fullmatch(path)
        if match is None:
            return False
        repository, subject = match.groups()
        tags = json.loads(get(f"{registry_url}/v2/{repository}/tags/list")[0])["tags"] or []
        wanted = parse_qs(query).get("artifactType")
        descriptors = []
        for tag in tags:
            body, media_type = get(
                f"{registry_url}/v2/{repository}/manifests/{tag}", OCI_MANIFEST_TYPE
            )
            manifest = json.loads(body)
            if manifest.get("subject", {}).get("digest") != subject:
                continue
            artifact_type = manifest.get("artifactType") or manifest["config"]["mediaType"]
            if wanted and artifact_type not in wanted:
                continue
            descriptors.append(
                {
                    "mediaType": media_type,
                    "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                    "size": len(body),
                    "artifactType": artifact_type,
                }
            )
        payload = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX_TYPE, "manifests": descriptors}
        ).encode()
        request.send_response(200)
        request.send_header("Content-Type", OCI_INDEX_TYPE)
        if wanted:
            request.send_header("OCI-Filters-Applied", "artifactType")
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)
        return True

    return behave
