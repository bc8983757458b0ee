import os
import stat
from pathlib import Path

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.conch.ssh.connection import SSHConnection
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dockmirror.auth.keystore import KeyStore
from dockmirror.config import check_repository_prefix
from dockmirror.manhole import (
    LOGIN_TIMEOUT,
    MAX_CONNECTIONS,
    AuthorizedKeysFile,
    KeysConsole,
    load_host_key,
    manhole_factory,
)


def public_line(comment: str) -> tuple[keys.Key, str]:
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    return key.public(), key.public().toString("openssh").decode() + f" {comment}\n"


def test_authorized_keys_are_read_at_each_login(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    authorized = AuthorizedKeysFile(path)
    assert authorized.getAuthorizedKeys(b"anyone") == []  # no file: nobody
    first, line = public_line("first")
    path.write_text("# comment\n\n" + line + "garbage\n")
    assert authorized.getAuthorizedKeys(b"root") == [first]
    second, line2 = public_line("second")
    path.write_text(line2)
    assert authorized.getAuthorizedKeys(b"root") == [second]
    assert authorized.getAuthorizedKeys(b"someone-else") == [second]


def test_host_key_made_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "manhole_host_key"
    key = load_host_key(path)
    assert key.isPublic() is False and key.sshType() == b"ssh-ed25519"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_host_key(path) == key


def test_factory_has_its_own_host_key(tmp_path: Path) -> None:
    a = manhole_factory({}, tmp_path / "k", load_host_key(tmp_path / "a"), Clock())
    b = manhole_factory({}, tmp_path / "k", load_host_key(tmp_path / "b"), Clock())
    assert a.getPrivateKeys() != b.getPrivateKeys()
    assert a.portal.listCredentialsInterfaces() == b.portal.listCredentialsInterfaces()
    [interface] = a.portal.listCredentialsInterfaces()
    assert interface.__name__ == "ISSHPrivateKey"  # public keys only, no passwords


@pytest_twisted.ensureDeferred
async def test_keys_console(key_store: KeyStore) -> None:
    console = KeysConsole(key_store, lambda p: check_repository_prefix(p, ["hub"]))
    assert "create(name, repositories=None)" in repr(console)
    new = await console.create("ops", ["hub/team"])
    assert repr(new).startswith("<new key 'ops': appId app_")
    listed = await console.list()
    assert repr(listed).startswith("1 keys\n<key ")
    assert "only hub/team" in repr(listed)
    with pytest.raises(ValueError, match="UPSTREAM/PREFIX"):
        console.create("bad", ["elsewhere/team"])
    rotated = await console.rotate(new.app_id)
    revoked = await console.revoke(rotated.app_id)
    assert revoked.revoked
    stats = await console.stats()
    assert (stats["keys"], stats["active"], stats["revoked"]) == (2, 0, 2)


def _connect(factory: object, port: int) -> tuple[object, StringTransport]:
    address = IPv4Address("TCP", "127.0.0.1", port)
    protocol = factory.buildProtocol(address)  # type: ignore[attr-defined]
    transport = StringTransport(peerAddress=address)
    if protocol is not None:
        protocol.makeConnection(transport)
    return protocol, transport


def test_connections_must_log_in_in_time(tmp_path: Path) -> None:
    clock = Clock()
    factory = manhole_factory({}, tmp_path / "k", load_host_key(tmp_path / "h"), clock)
    factory.startFactory()
    idle, idle_transport = _connect(factory, 40001)
    logged_in, logged_in_transport = _connect(factory, 40002)
    assert idle_transport.value().startswith(b"SSH-2.0-")  # the server's version line
    logged_in.setService(SSHConnection())  # type: ignore[attr-defined]  # as after userauth
    clock.advance(LOGIN_TIMEOUT - 1)
    assert not idle_transport.disconnecting
    clock.advance(1)
    assert idle_transport.disconnecting
    assert not logged_in_transport.disconnecting
    assert not clock.getDelayedCalls()


def test_connections_are_capped(tmp_path: Path) -> None:
    clock = Clock()
    factory = manhole_factory({}, tmp_path / "k", load_host_key(tmp_path / "h"), clock)
    factory.startFactory()
    opened = [_connect(factory, 41000 + i) for i in range(MAX_CONNECTIONS)]
    assert all(protocol is not None for protocol, _ in opened)
    assert _connect(factory, 42000)[0] is None
    first, _ = opened[0]
    first.connectionLost(None)  # type: ignore[attr-defined]
    assert _connect(factory, 42001)[0] is not None
