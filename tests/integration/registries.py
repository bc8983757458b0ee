"""Real ``docker-registry`` (CNCF distribution) processes and a token server.

Everything listens on 127.0.0.1 only.  Processes run in their own process group
and are killed as a group, so nothing they spawn outlives a test session.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
RegistryMode = Literal["plain", "htpasswd", "token"]
Credentials = tuple[str, str]

_PROXY_VARIABLES = frozenset(
    name
    for base in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    for name in (base, base.upper())
)
# Never let urllib route loopback requests through an environment proxy.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The current environment without proxy settings, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
    env.update(overrides)
    return env


def http_status(url: str, timeout: float = 5.0, context: ssl.SSLContext | None = None) -> int:
    """GET ``url`` without any proxy and return the HTTP status (errors included).

    An ``https`` URL is verified with ``context`` (default: the system's CAs).
    """
    opener = _opener
    if context is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def answers(url: str, context: ssl.SSLContext | None = None) -> bool:
    """Whether ``url`` answers with any HTTP status (over TLS verified with ``context``)."""
    try:
        http_status(url, timeout=1.0, context=context)
    except OSError:
        return False
    return True


class ManagedProcess:
    """A subprocess in its own process group, output appended to ``log_path``.

    The group leader is only reaped after its group has been SIGKILLed, so
    the group ID cannot have been reused by someone else's process.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else subprocess_env()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process ID (the process must have been started)."""
        assert self._process is not None
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._process is not None and not self._leader_exited()

    def start(self, ready: str | Callable[[], bool], timeout: float = 20.0) -> None:
        """Start the process; return once it is ready.

        ``ready`` is a URL that must answer with any HTTP status, or a
        predicate that must return true.  On timeout or early exit the
        process is killed and a RuntimeError carrying the log is raised.
        """
        if self.running:
            raise RuntimeError(f"already running: {self.argv}")
        self.kill9()  # reap an earlier run that exited by itself
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        is_ready = ready if callable(ready) else lambda: answers(ready)
        what = "its readiness check" if callable(ready) else ready
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                self.kill9()
                raise RuntimeError(
                    f"{self.argv[0]} exited before answering {what}:\n{self.log_text()}"
                )
            if is_ready():
                return
            time.sleep(0.05)
        self.kill9()
        raise RuntimeError(
            f"{self.argv[0]} did not answer {what} within {timeout}s:\n{self.log_text()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, escalating to SIGKILL after ``timeout``."""
        if self._process is None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not self._leader_exited() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.kill9()

    def send_signal(self, signum: signal.Signals) -> None:
        """Signal the process group (it must be running)."""
        self._signal_group(signum)

    def kill9(self) -> None:
        """SIGKILL the whole process group and reap the leader (no-op if not started)."""
        if self._process is None:
            return
        self._signal_group(signal.SIGKILL)
        self._process.wait()
        self._process = None

    def log_text(self) -> str:
        """Everything the process (and its earlier runs) wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self._process is not None
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            pass  # nothing left in the group but possibly the (zombie) leader

    def _leader_exited(self) -> bool:
        """Whether the leader exited, leaving it unreaped (a zombie holding its PID)."""
        assert self._process is not None
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, self._process.pid, flags) is not None


@dataclass(frozen=True)
class TokenRequest:
    """One GET request received by the :class:`TokenServer`."""

    path: str
    query: dict[str, list[str]]
    authorization: bool
    username: str | None
    client: str
    status: int

    @property
    def scopes(self) -> list[str]:
        """The requested scopes."""
        return _scopes(self.query)


class _Running:
    """Started on entering a ``with`` block and stopped on leaving it."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TokenServer(_Running):
    """An auth.docker.io look-alike issuing RS256 JWTs for distribution's token auth.

    ``GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]`` with
    optional Basic auth.  Valid credentials get pull and push; anonymous
    callers get pull if ``anonymous_pull``, otherwise a token without access
    (like Docker Hub); wrong credentials get 401.  ``anonymous_pull``,
    ``token_lifetime`` and ``credentials`` may be changed while running.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        service: str = "registry.docker.io",
        issuer: str = "auth.docker.io",
        credentials: Credentials = ("tokenuser", "tokenpass"),
        anonymous_pull: bool = True,
        token_lifetime: int = 300,
    ) -> None:
        self.service = service
        self.issuer = issuer
        self.credentials = credentials
        self.anonymous_pull = anonymous_pull
        self.token_lifetime = token_lifetime
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate = _self_signed_certificate(self._key, issuer)
        self.cert_path = workdir / "token-signing-cert.pem"
        self.cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        der = certificate.public_bytes(serialization.Encoding.DER)
        self._x5c = [base64.b64encode(der).decode()]
        self._requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self._bind()  # the port (so the realm) is known before start()

    @property
    def origin(self) -> str:
        """Its origin, for a mirror's ``token_realms``: it is not the registry's."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def realm(self) -> str:
        """The token endpoint URL, as put in the registry's challenge."""
        return f"{self.origin}/token"

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot of all requests received so far."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def issue(self, username: str | None, scopes: Sequence[str]) -> str:
        """A signed token for ``username`` (None: anonymous) granting what it may of ``scopes``."""
        allowed = {"pull", "push"} if username else ({"pull"} if self.anonymous_pull else set())
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = sorted(allowed.intersection(actions.split(",")))
            if kind == "repository" and name and granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": username or "",
            "aud": self.service,
            "exp": now + self.token_lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": self._x5c})

    def start(self) -> None:
        """Serve in a daemon thread; after :meth:`stop`, on the same port again."""
        if self._server is None:
            self._bind()
        assert self._server is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (connections are then refused)."""
        if self._server is None:
            return
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self._server = None

    def _bind(self) -> None:
        self._server = ThreadingHTTPServer((LOOPBACK, self.port), _handler_for(self))
        self.port = int(self._server.server_address[1])

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)


def _handler_for(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class TokenHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query, keep_blank_values=True)
            body: dict[str, object]
            header = self.headers.get("Authorization")
            username = _basic_username(header, server.credentials)
            if url.path != "/token":
                status, body = HTTPStatus.NOT_FOUND, {"details": "not found"}
            elif header is not None and username is None:
                status = HTTPStatus.UNAUTHORIZED
                body = {"details": "incorrect username or password"}
            elif query.get("service", [server.service]) != [server.service]:
                status, body = HTTPStatus.BAD_REQUEST, {"details": "unknown service"}
            else:
                token = server.issue(username, _scopes(query))
                status, body = (
                    HTTPStatus.OK,
                    {
                        "token": token,
                        "access_token": token,
                        "expires_in": server.token_lifetime,
                        "issued_at": datetime.now(UTC).isoformat(),
                    },
                )
            server._record(
                TokenRequest(
                    url.path,
                    query,
                    header is not None,
                    username,
                    self.client_address[0],
                    int(status),
                )
            )
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            """Requests are recorded on the server instead of printed."""

    return TokenHandler


def _scopes(query: Mapping[str, list[str]]) -> list[str]:
    """Scopes from repeated and/or space-separated ``scope`` parameters."""
    return [scope for value in query.get("scope", []) for scope in value.split()]


def _basic_username(header: str | None, credentials: Credentials) -> str | None:
    """The user name if ``header`` is Basic auth with exactly ``credentials``."""
    if header is None or not header.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(header[len("Basic ") :], validate=True).decode()
    except ValueError:
        return None
    username, _, password = decoded.partition(":")
    expected_user, expected_password = credentials
    ok = secrets.compare_digest(username, expected_user) & secrets.compare_digest(
        password, expected_password
    )
    return username if ok else None


def _self_signed_certificate(key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True)
class AccessLogEntry:
    """One line of the registry's access log (Apache combined format)."""

    client: str
    method: str
    uri: str
    status: int


_ACCESS_LOG_LINE = re.compile(
    r"^(?P<client>\S+) \S+ \S+ \[[^\]]+\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" (?P<status>\d{3}) '
)
_BARRIER_PREFIX = "/?log-barrier="


class Registry(_Running):
    """A ``docker-registry serve`` process with its own storage, config and log.

    Modes: ``plain`` (no auth), ``htpasswd`` (Basic auth with ``credentials``)
    and ``token`` (bearer tokens from ``token_server``, which must be given).
    """

    def __init__(
        self,
        workdir: Path,
        mode: RegistryMode = "plain",
        *,
        token_server: TokenServer | None = None,
        credentials: Credentials = ("reguser", "regpass"),
    ) -> None:
        if (mode == "token") != (token_server is not None):
            raise ValueError("token_server is required for, and only for, token mode")
        self.mode = mode
        self.token_server = token_server
        self._htpasswd_credentials = credentials
        self.port = free_port()
        self.storage_dir = workdir / "storage"
        self.storage_dir.mkdir()
        self.config_path = workdir / "config.yml"
        self.config_path.write_text(json.dumps(self._config(workdir), indent=2))
        self._process = ManagedProcess(
            ["docker-registry", "serve", str(self.config_path)],
            log_path=workdir / "registry.log",
            cwd=workdir,
        )

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in image references."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def creds(self) -> Credentials | None:
        """Credentials that may push to this registry (None for ``plain``)."""
        if self.token_server is not None:
            return self.token_server.credentials
        return self._htpasswd_credentials if self.mode == "htpasswd" else None

    @property
    def running(self) -> bool:
        return self._process.running

    def start(self) -> None:
        """Start serving (again, on the same port and storage); wait for ``/v2/``."""
        self._process.start(f"{self.url}/v2/")

    def stop(self) -> None:
        """Stop the registry; :meth:`start` brings it back with the same content."""
        self._process.stop()

    def log_text(self) -> str:
        return self._process.log_text()

    def requests(self) -> list[AccessLogEntry]:
        """All requests served so far (across restarts), from the access log."""
        if self.running:
            self._wait_for_log_barrier()
        matches = (_ACCESS_LOG_LINE.match(line) for line in self.log_text().splitlines())
        return [
            AccessLogEntry(m["client"], m["method"], m["uri"], int(m["status"]))
            for m in matches
            if m and not m["uri"].startswith(_BARRIER_PREFIX)
        ]

    def count_requests(self, method: str, path_substring: str, status: int | None = None) -> int:
        """How many ``method`` requests whose URI contains ``path_substring`` were served.

        ``status`` optionally restricts the count to one response status.
        """
        return sum(
            1
            for entry in self.requests()
            if entry.method == method
            and path_substring in entry.uri
            and (status is None or entry.status == status)
        )

    def storage_path_of_blob(self, digest: str) -> Path:
        """The file holding blob ``digest`` in the filesystem storage driver."""
        algorithm, _, hex_digest = digest.partition(":")
        blobs = self.storage_dir / "docker/registry/v2/blobs" / algorithm
        return blobs / hex_digest[:2] / hex_digest / "data"

    def _wait_for_log_barrier(self, timeout: float = 5.0) -> None:
        """Make sure log lines of requests that already completed are written.

        distribution writes the access-log line after the response, so a
        client can see a whole response before its line exists.  A request
        for a unique marker URI, awaited in the log, closes that gap.
        """
        marker = f"{_BARRIER_PREFIX}{uuid.uuid4().hex}"
        http_status(f"{self.url}{marker}")
        wait_until(lambda: marker in self.log_text(), timeout, interval=0.01)

    def _config(self, workdir: Path) -> dict[str, object]:
        """distribution configuration (JSON, which is valid YAML)."""
        config: dict[str, object] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
            # Foreign (non-distributable) layers, with their URLs, are accepted.
            "validation": {"manifests": {"urls": {"allow": ["^https?://"]}}},
        }
        if self.mode == "htpasswd":
            htpasswd_path = workdir / "htpasswd"
            user, password = self._htpasswd_credentials
            htpasswd_path.write_bytes(
                subprocess.run(
                    ["htpasswd", "-Bbn", user, password], capture_output=True, check=True
                ).stdout
            )
            config["auth"] = {"htpasswd": {"realm": "dockmirror-tests", "path": str(htpasswd_path)}}
        elif self.token_server is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.token_server.service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(self.token_server.cert_path),
                }
            }
        return config


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)
