"""TLS listeners whose certificate is reloaded without a restart.

``ssl:`` endpoint strings are built as usual, but their context factory is
swapped for one that re-reads the key and certificate files when they change
on disk (as a certbot renewal does) or on SIGHUP.  Old-style context
factories are asked for a context on every connection, so a new certificate
takes effect for the next connection.  Only TLS 1.2 and later are offered;
TLS 1.2 only with ECDHE key exchange and AES-GCM or ChaCha20-Poly1305 (every
TLS 1.3 suite is of that kind), and the certificate file may hold the whole
chain (``fullchain.pem``).

A TLS listener is a TCP port whose factory is wrapped in :class:`TLSFactory`:
Twisted's memory-BIO TLS, with whole writes into OpenSSL
(:class:`WholeRecordsTLS`).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _openssl
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    serverFromString,
)
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocolFactory,
    ISSLTransport,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from dockmirror.config import Config, ConfigError
from dockmirror.errors import RegistryError

log = Logger()

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
#: Seconds between checks of the files on disk.
CHECK_INTERVAL = 5.0
#: TLS 1.2 cipher suites offered: forward secrecy and AEAD only.
CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
#: Plaintext bytes handed to OpenSSL in one call (4 records).
TLS_WRITE = 64 << 10
#: Bytes a TLS record adds to its plaintext, rounded up: header, tag, content type.
_RECORD_OVERHEAD = 64
_RECORD = 1 << 14


def endpoint_options(description: str) -> dict[str, str]:
    """The ``key=value`` arguments of a Twisted endpoint string."""
    parts = re.split(r"(?<!\\):", description)
    options = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            options[key] = re.sub(r"\\(.)", r"\1", value)
    return options


@implementer(IOpenSSLContextFactory)
class ReloadingContextFactory:
    """Builds the server TLS context, rebuilding it when the files change."""

    def __init__(
        self,
        private_key: str,
        certificate: str,
        extra_chain: str | None = None,
        clock: Any = None,
    ) -> None:
        self.paths = [p for p in (private_key, certificate, extra_chain) if p]
        self._private_key = private_key
        self._certificate = certificate
        self._extra_chain = extra_chain
        self._clock = clock
        self._stamp: list[tuple[int, int, int]] = []
        self._checked = float("-inf")
        self._context = self._load()

    def _stat(self) -> list[tuple[int, int, int]]:
        stamps = []
        for path in self.paths:
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return stamps

    def _load(self) -> SSL.Context:
        """A context for the files as they are now; ValueError naming the file if unusable."""
        self._stamp = self._stat()
        chain = _certificates(self._certificate)
        if self._extra_chain:
            chain += _certificates(self._extra_chain)
        with open(self._private_key, "rb") as f:
            data = f.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ValueError(f"{self._private_key}: not a usable PEM private key ({e})") from None
        try:
            options = ssl.CertificateOptions(
                privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
                certificate=chain[0],
                extraCertChain=chain[1:],
                raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
                acceptableCiphers=CIPHERS,
            )
            return options.getContext()
        except (VerifyError, SSL.Error, crypto.Error, TypeError) as e:
            raise ValueError(
                f"{self._private_key}: the private key does not match the certificate"
                f" in {self._certificate} ({e})"
            ) from None

    def reload(self) -> bool:
        """Re-read the files; on failure keep serving the old certificate."""
        try:
            self._context = self._load()
        except (OSError, ValueError, SSL.Error) as e:
            log.error(
                "keeping the current TLS certificate: cannot load {paths}: {error}",
                paths=self.paths,
                error=str(e),
            )
            return False
        log.info("loaded TLS certificate {path}", path=self._certificate)
        return True

    def getContext(self) -> SSL.Context:
        now = self._clock.seconds() if self._clock is not None else 0.0
        if self._clock is None or now - self._checked >= CHECK_INTERVAL:
            self._checked = now
            try:
                changed = self._stat() != self._stamp
            except OSError:
                changed = False
            if changed:
                self.reload()
        return self._context


def _certificates(path: str) -> list[crypto.X509]:
    """The PEM certificates in *path*, in order; ValueError naming the file."""
    with open(path, "rb") as f:
        found = _PEM_CERT.findall(f.read())
    if not found:
        raise ValueError(f"{path}: no PEM certificate found")
    try:
        return [crypto.X509.from_cryptography(x509.load_pem_x509_certificate(c)) for c in found]
    except ValueError as e:
        raise ValueError(f"{path}: malformed certificate ({e})") from None


@implementer(ISSLTransport)
class WholeRecordsTLS(BufferingTLSTransport):
    """Twisted's TLS transport, with fewer calls into OpenSSL per byte.

    Twisted hands OpenSSL 16 KiB at a time (one record: pyOpenSSL asks for
    partial writes) and copies each slice first.  Here a write goes to
    OpenSSL :data:`TLS_WRITE` bytes at a time, as views of the caller's
    bytes, and the records it makes come out of the memory BIO in one read.
    OpenSSL still cuts 16 KiB records; only the Python work per record goes.
    The transport provides ``ISSLTransport``, as Twisted's own TLS ports do.

    It is also a :class:`dockmirror.streaming.Sealer`: a file sender can
    have whole chunks sealed (:meth:`seal`) and take every record the
    connection makes (:meth:`divert`), to write them on the socket itself.
    """

    _sink: Callable[[bytes], object] | None = None

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        # No public API clears a mode; without it, each call writes one record.
        connection: Any = self._tlsConnection
        clear = getattr(_openssl, "SSL_clear_mode", None)
        ssl_handle = getattr(connection, "_ssl", None)
        if clear is not None and ssl_handle is not None:
            clear(ssl_handle, _openssl.SSL_MODE_ENABLE_PARTIAL_WRITE)

    @property
    def sealing(self) -> bool:
        """Whether :meth:`seal` may be used: handshake done, nothing held back, open."""
        return bool(
            self._handshakeDone
            and not self._appSendBuffer
            and not self._lostTLSConnection
            and not self.disconnecting
            and self._sink is None
        )

    def divert(self, sink: Callable[[bytes], object] | None) -> None:
        """Hand the records for the peer to *sink* from now on; None: to the transport again.

        Small writes waiting for the next reactor turn go to the transport first.
        """
        if sink is not None:
            self._aggregator.flush()
        self._sink = sink

    def seal(self, data: memoryview) -> None:
        """Encrypt all of *data* now; its records go where :meth:`divert` said.

        Raises ``SSL.Error`` (``WantReadError`` while the peer renegotiates).
        """
        sent = 0
        while sent < len(data):  # one call, unless partial writes could not be turned off
            sent += self._tlsConnection.send(data[sent:])
        self._flushSendBIO(len(data) + _RECORD_OVERHEAD * (len(data) // _RECORD + 1))

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                count = self._tlsConnection.send(view[sent : sent + TLS_WRITE])
            except SSL.WantReadError:
                self._bufferedWrite(bytes(view[sent:]))
                break
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                break
            sent += count
            self._flushSendBIO(count + _RECORD_OVERHEAD * (count // _RECORD + 1))

    def _flushSendBIO(self, expected: int = 1 << 15) -> None:
        """Write what OpenSSL has for the peer, in as few reads as it takes."""
        while True:
            try:
                data = self._tlsConnection.bio_read(expected)
            except SSL.WantReadError:
                return  # nothing (more) in the BIO
            if self._sink is not None:
                self._sink(data)
            else:
                assert self.transport is not None
                self.transport.write(data)
            if len(data) < expected:
                return


class TLSFactory(TLSMemoryBIOFactory):
    """Wraps a server's factory in :class:`WholeRecordsTLS`."""

    protocol = WholeRecordsTLS

    def __init__(self, contextFactory: Any, wrappedFactory: IProtocolFactory) -> None:
        super().__init__(contextFactory, False, wrappedFactory)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """A TCP endpoint whose connections speak TLS through :class:`TLSFactory`."""

    def __init__(self, tcp: IStreamServerEndpoint, context: ReloadingContextFactory) -> None:
        self.tcp = tcp
        self.context = context

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.tcp.listen(TLSFactory(self.context, protocolFactory))


def tls_endpoint(reactor: Any, description: str) -> tuple[Any, ReloadingContextFactory | None]:
    """The endpoint for *description*, with a reloading factory for ``ssl:``.

    Raises ValueError for a description or certificate that cannot be used.
    """
    factory = None
    if description.split(":", 1)[0].strip().lower() == "ssl":
        # The files are checked here first, for a message that names the file.
        options = endpoint_options(description)
        private_key = options.get("privateKey", "server.pem")
        try:
            factory = ReloadingContextFactory(
                private_key,
                options.get("certKey", private_key),
                options.get("extraCertChain"),
                clock=reactor,
            )
        except OSError as e:
            raise ValueError(f"{e.filename}: {e.strerror}") from e
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, OSError, SSL.Error, crypto.Error) as e:
        raise ValueError(str(e) or type(e).__name__) from e
    if not isinstance(endpoint, SSL4ServerEndpoint) or factory is None:
        return endpoint, None
    # The same address and backlog, over TCP: the TLS layer is the factory's.
    tcp = TCP4ServerEndpoint(reactor, endpoint._port, endpoint._backlog, endpoint._interface)
    return TLSServerEndpoint(tcp, factory), factory


def listen_endpoint(
    reactor: Any, config: Config, description: str, key: str = "server.listen"
) -> Any:
    """:func:`tls_endpoint` for a listener of *config*; an error names its key."""
    try:
        return tls_endpoint(reactor, description)
    except ValueError as e:
        raise ConfigError(f"{config.source}: {key}: {description!r}: {e}") from None


#: What a TLS client handshake starts with: a handshake record.
_TLS_HANDSHAKE = b"\x16"
_PLAIN_HTTP_BODY = RegistryError(
    "UNSUPPORTED", "This listener speaks plain HTTP, not TLS", status=400
).body()
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


class _PlainHTTPOnly(ProtocolWrapper):
    """Answers a TLS handshake on a plain listener at once.

    Clients that try HTTPS first (skopeo, podman, containerd with an insecure
    registry) otherwise wait for their TLS timeout before falling back; an
    HTTP answer makes them report "server gave HTTP response to HTTPS
    client" straight away.
    """

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first and data:
            self._first = False
            if data[:1] == _TLS_HANDSHAKE and self.transport is not None:
                self.transport.write(_PLAIN_HTTP_ANSWER)
                self.transport.loseConnection()
                return
        super().dataReceived(data)


class PlainHTTPFactory(WrappingFactory):
    protocol = _PlainHTTPOnly
    noisy = False


class ReloadService(Service):
    """Handles SIGHUP: reloads every TLS certificate, or logs that there is none.

    SIGHUP is what ``systemctl reload`` sends; left to its default it would
    end the process.
    """

    def __init__(self, reactor: Any, factories: list[ReloadingContextFactory]) -> None:
        self._reactor = reactor
        self.factories = factories
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def _hangup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Reload what can be reloaded."""
        if not self.factories:
            log.info("SIGHUP: nothing to reload (no TLS listener)")
            return
        log.info("SIGHUP: reloading TLS certificates")
        for factory in self.factories:
            factory.reload()
