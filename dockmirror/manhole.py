"""The SSH manhole: a Python prompt inside the running server, for operators.

Public-key authentication only, against an OpenSSH ``authorized_keys`` file
that is read again at each login; any user name is accepted, the key decides.
Clients need a terminal: ``ssh -t -p 2222 admin@localhost``.  A connection
must log in within :data:`LOGIN_TIMEOUT` seconds, and at most
:data:`MAX_CONNECTIONS` are open at once.

The namespace is a dict that :mod:`dockmirror.service` fills (``keys``,
``upstreams``, ``config``, ...).  Results print with their ``repr``, a
Deferred's once it fires, so what the namespace offers has readable reprs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys
from twisted.conch.ssh.factory import SSHFactory
from twisted.conch.ssh.transport import SSHServerTransport
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dockmirror.auth.keys import KeyInfo, KeyList, NewKey
from dockmirror.auth.keystore import KeyStore
from dockmirror.auth.secretfile import load_or_create

log = Logger()
audit = Logger(namespace="dockmirror.audit")
T = TypeVar("T")

HOST_KEY_FILE = "manhole_host_key"
#: Seconds a connection has to authenticate before it is closed.
LOGIN_TIMEOUT = 30.0
#: Connections open at once, logged in or not; more are closed at once.
MAX_CONNECTIONS = 10


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """An ``authorized_keys`` file, read at each login, the same for every user name."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def getAuthorizedKeys(self, username: bytes) -> list[keys.Key]:
        try:
            with self.path.open("rb") as f:
                return list(readAuthorizedKeyFile(f))
        except OSError as e:
            log.error("cannot read {path}: {error}", path=str(self.path), error=e.strerror)
            return []


@implementer(ICredentialsChecker)
class _LoggingKeyChecker:
    """Public-key authentication that logs who logged in (by key) and who was refused."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, authorized: AuthorizedKeysFile) -> None:
        self._checker = SSHPublicKeyChecker(authorized)

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        d: Deferred[bytes | tuple[()]] = self._checker.requestAvatarId(credentials)

        def logged(result: Any) -> Any:
            if isinstance(result, Failure) and result.check(ValidPublicKey):
                return result  # the client asking whether a key would do, before signing
            digest = keys.Key.fromString(credentials.blob).fingerprint(
                keys.FingerprintFormats.SHA256_BASE64
            )
            fingerprint = "SHA256:" + digest.rstrip("=")  # as ssh-keygen -l shows it
            user = credentials.username.decode("utf-8", "replace")
            if isinstance(result, Failure):
                log.warn(
                    "manhole login as {user} refused for key {key}", user=user, key=fingerprint
                )
            else:
                log.info("manhole login as {user} with key {key}", user=user, key=fingerprint)
            return result

        d.addBoth(logged)
        return d


class _Session(manhole_ssh.TerminalSession):
    """A terminal session that follows window resizes, ends on EOF, and exits with 0."""

    def openShell(self, proto: Any) -> None:
        # Leaving the prompt ends the session with exit status 0, as a shell's exit would.
        proto.loseConnection = lambda: proto.processEnded(Failure(ProcessDone(0)))
        self._terminal = self.chainedProtocolFactory()
        self.transportFactory(
            proto, self._terminal, IConchUser(self.original), self.width, self.height
        )

    def windowChanged(self, newWindowSize: Sequence[int]) -> None:
        height, width = newWindowSize[:2]
        if self._terminal.terminalProtocol is not None:
            self._terminal.terminalProtocol.terminalSize(width, height)

    def eofReceived(self) -> None:
        self._terminal.loseConnection()


def load_host_key(path: Path) -> keys.Key:
    """The manhole's Ed25519 host key at *path*, made (mode 0600) if there is none."""
    return keys.Key.fromString(
        load_or_create(
            path, lambda: keys.Key(ed25519.Ed25519PrivateKey.generate()).toString("openssh")
        )
    )


@implementer(IRealm)
class _Realm(manhole_ssh.TerminalRealm):
    sessionFactory = _Session

    def __init__(self, namespace: dict[str, Any]) -> None:
        super().__init__()
        self._namespace = namespace

    def chainedProtocolFactory(self) -> insults.ServerProtocol:  # type: ignore[override]
        return insults.ServerProtocol(manhole.ColoredManhole, self._namespace)


class _Transport(SSHServerTransport):
    """An SSH server connection that is closed unless it logs in within the timeout."""

    factory: _Factory
    _login_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self._login_timer = self.factory.clock.callLater(LOGIN_TIMEOUT, self._login_expired)
        super().connectionMade()

    def _login_expired(self) -> None:
        self._login_timer = None
        transport: Any = self.transport
        log.warn(
            "manhole: {peer} did not log in within {timeout:.0f}s; closing",
            peer=str(transport.getPeer()),
            timeout=LOGIN_TIMEOUT,
        )
        transport.abortConnection()

    def setService(self, service: Any) -> None:
        super().setService(service)
        if service.name == b"ssh-connection" and self._login_timer is not None:
            self._login_timer.cancel()  # logged in
            self._login_timer = None

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.connections -= 1
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        super().connectionLost(reason)


class _Factory(SSHFactory):
    """An SSH server factory with its own host key, and a cap on connections.

    (``ConchFactory`` keeps host keys in class-level dicts shared by all.)
    """

    protocol = _Transport

    def __init__(self, portal: Portal, host_key: keys.Key, clock: IReactorTime) -> None:
        self.portal = portal
        self._host_key = host_key
        self.clock = clock
        self.connections = 0

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.connections >= MAX_CONNECTIONS:
            log.warn(
                "manhole: refusing {peer}: {limit} connections already open",
                peer=str(addr),
                limit=MAX_CONNECTIONS,
            )
            return None
        return super().buildProtocol(addr)

    def getPublicKeys(self) -> dict[bytes, keys.Key]:
        return {self._host_key.sshType(): self._host_key.public()}

    def getPrivateKeys(self) -> dict[bytes, keys.Key]:
        return {self._host_key.sshType(): self._host_key}


def manhole_factory(
    namespace: dict[str, Any], authorized_keys: Path, host_key: keys.Key, clock: IReactorTime
) -> SSHFactory:
    """An SSH server factory serving a Python prompt over *namespace*."""
    portal = Portal(_Realm(namespace), [_LoggingKeyChecker(AuthorizedKeysFile(authorized_keys))])
    return _Factory(portal, host_key, clock)


class KeysConsole:
    """``keys`` at the manhole prompt: the API keys, through the server's key store."""

    def __init__(self, store: KeyStore, check_prefix: Callable[[str], str]) -> None:
        self._store = store
        self._check_prefix = check_prefix

    def list(self) -> Deferred[KeyList]:
        """Every key, revoked ones included."""
        return Deferred.fromCoroutine(self._store.list())

    def create(self, name: str, repositories: Iterable[str] | None = None) -> Deferred[NewKey]:
        """A new key; *repositories* (``UPSTREAM/PREFIX``, ...) limits what it may pull."""
        limits = None if repositories is None else [self._check_prefix(r) for r in repositories]
        return self._audited("created", Deferred.fromCoroutine(self._store.create(name, limits)))

    def revoke(self, app_id: str) -> Deferred[KeyInfo]:
        return self._audited("revoked", Deferred.fromCoroutine(self._store.revoke(app_id)))

    def rotate(self, app_id: str) -> Deferred[NewKey]:
        """A new key replacing *app_id*, which is revoked."""
        return self._audited("rotated", Deferred.fromCoroutine(self._store.rotate(app_id)), app_id)

    @staticmethod
    def _audited(action: str, done: Deferred[T], old: str | None = None) -> Deferred[T]:
        """Log *action* on the key *done* fires with (the replaced one, for a rotation)."""

        def logged(key: T) -> T:
            new = getattr(key, "app_id", "?")
            audit.info(
                "key {app_id} {action} by the operator (manhole){replaced}",
                app_id=old or new,
                action=action,
                replaced=f", replaced by {new}" if old else "",
                audit=f"key-{action}",
            )
            return key

        return done.addCallback(logged)

    def stats(self) -> Deferred[dict[str, Any]]:
        """Totals over all keys; usage not yet written is ``pendingUsage``."""
        return Deferred.fromCoroutine(self._store.stats())

    def __repr__(self) -> str:
        return (
            "<keys: list(), create(name, repositories=None), revoke(appId), rotate(appId), stats()>"
        )
