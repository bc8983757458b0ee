"""TLS listeners whose certificate is reloaded without a restart.

``ssl:`` endpoint strings are built as usual, but their context factory is
swapped for one that re-reads the key and certificate files when they change
on disk (as a certbot renewal does) or on SIGHUP.  Old-style context
factories are asked for a context on every connection, so a new certificate
takes effect for the next connection.  Only TLS 1.2 and later are offered,
with Twisted's default modern cipher list, and the certificate file may hold
the whole chain (``fullchain.pem``).
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

log = Logger()

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
#: Seconds between checks of the files on disk.
CHECK_INTERVAL = 5.0


def endpoint_options(description: str) -> dict[str, str]:
    """The ``key=value`` arguments of a Twisted endpoint string."""
    parts = re.split(r"(?<!\\):", description)
    options = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            options[key] = re.sub(r"\\(.)", r"\1", value)
    return options


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
        self._stamp = self._stat()
        with open(self._certificate, "rb") as f:
            certs = _PEM_CERT.findall(f.read())
        if self._extra_chain:
            with open(self._extra_chain, "rb") as f:
                certs += _PEM_CERT.findall(f.read())
        if not certs:
            raise ValueError(f"{self._certificate}: no PEM certificate found")
        with open(self._private_key, "rb") as f:
            leaf = ssl.PrivateCertificate.loadPEM(certs[0] + b"\n" + f.read())
        options = ssl.CertificateOptions(
            privateKey=leaf.privateKey.original,
            certificate=leaf.original,
            extraCertChain=[ssl.Certificate.loadPEM(c).original for c in certs[1:]],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
        context = options.getContext()
        context.check_privatekey()
        return context

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


def tls_endpoint(reactor: Any, description: str) -> tuple[Any, ReloadingContextFactory | None]:
    """The endpoint for *description*, with a reloading factory for ``ssl:``.

    Raises ValueError for a description or certificate that cannot be used.
    """
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, OSError, SSL.Error) as e:
        raise ValueError(str(e) or type(e).__name__) from e
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint, None
    options = endpoint_options(description)
    private_key = options.get("privateKey", "server.pem")
    try:
        factory = ReloadingContextFactory(
            private_key,
            options.get("certKey", private_key),
            options.get("extraCertChain"),
            clock=reactor,
        )
    except (OSError, SSL.Error) as e:
        raise ValueError(str(e)) from e
    endpoint._sslContextFactory = factory
    return endpoint, factory


#: What a TLS client handshake starts with: a handshake record.
_TLS_HANDSHAKE = b"\x16"
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: 39\r\n\r\nThis listener speaks plain HTTP, not TLS"
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


class CertificateReloadService(Service):
    """Reloads every TLS certificate on SIGHUP."""

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
        log.info("SIGHUP: reloading TLS certificates")
        for factory in self.factories:
            self._reactor.callFromThread(factory.reload)
