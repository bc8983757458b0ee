"""Clients that stop reading a blob are cut at ``server.send_timeout``; slow readers are not."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import time

import pytest

from .conftest import Dockmirror, DockmirrorFactory, Seeder
from .images import Blob
from .registries import LOOPBACK, Registry, wait_until
from .test_pull import curl
from .tls import client_context

SEND_TIMEOUT = 2
#: Far more than the socket buffers on both sides can hold.
LAYER = 24 << 20
TCP_ESTABLISHED = 1


def _connect(mirror: Dockmirror, path: str) -> socket.socket:
    """Ask for *path* and read the response's head only."""
    raw = socket.create_connection((LOOPBACK, mirror.port), timeout=10)
    sock = client_context().wrap_socket(raw, server_hostname=LOOPBACK) if mirror.tls else raw
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {mirror.host}\r\n\r\n".encode())
    head = sock.recv(1024)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock


def _established(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED)


def _open_files(mirror: Dockmirror, digest: str) -> int:
    """How many files of the server are open on the blob *digest*."""
    hex_digest = digest.partition(":")[2]
    count = 0
    for fd in os.listdir(f"/proc/{mirror.pid}/fd"):
        try:
            count += hex_digest in os.readlink(f"/proc/{mirror.pid}/fd/{fd}")
        except OSError:
            pass  # closed meanwhile
    return count


def _read_all(sock: socket.socket) -> int:
    """Read until the server closes or resets; the byte count."""
    count = 0
    try:
        while data := sock.recv(1 << 20):
            count += len(data)
    except (ConnectionResetError, ssl.SSLError):
        pass
    return count


def _large_blob(
    registry: Registry, dockmirror: DockmirrorFactory, seeded: Seeder, repo: str, tls: bool
) -> tuple[Dockmirror, Blob, str]:
    """A mirror of *registry* with a short send timeout, a large blob there, and its path."""
    image = seeded(registry, repo, "v1", layers=(LAYER,))
    (layer,) = image.platforms[0].layers
    mirror = dockmirror(
        {"hub": {"plugin": "registry", "url": registry.url, "default": True}},
        extra={"server": {"send_timeout": SEND_TIMEOUT}},
        tls=tls,
    )
    return mirror, layer, f"/v2/{repo}/blobs/{layer.digest}"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_client_that_stops_reading_is_cut_and_others_are_served(
    plain_registry: Registry,
    dockmirror: DockmirrorFactory,
    seeded: Seeder,
    unique_repo: str,
    tls: bool,
) -> None:
    mirror, layer, path = _large_blob(plain_registry, dockmirror, seeded, unique_repo, tls)
    # First while the blob is filled (the reader follows the fill), then from the cache.
    for attempt in (1, 2):
        stalled = _connect(mirror, path)
        assert _open_files(mirror, layer.digest) >= 1
        started = time.monotonic()
        wait_until(lambda s=stalled: not _established(s), timeout=SEND_TIMEOUT * 5 + 10)
        waited = time.monotonic() - started
        assert _read_all(stalled) < layer.size
        stalled.close()
        wait_until(lambda n=attempt: mirror.log_text().count("(server.send_timeout)") == n)
        # The reader let go of the file, and so of the blob's pin.
        wait_until(lambda: _open_files(mirror, layer.digest) == 0)
        status, _, body = curl(f"{mirror.url}{path}")
        assert status == 200 and f"sha256:{hashlib.sha256(body).hexdigest()}" == layer.digest
        print(f"attempt {attempt}: cut after {waited:.1f}s")
    assert "Traceback" not in mirror.log_text()


def test_a_slow_reader_is_never_cut(
    plain_registry: Registry, dockmirror: DockmirrorFactory, seeded: Seeder, unique_repo: str
) -> None:
    mirror, _, path = _large_blob(plain_registry, dockmirror, seeded, unique_repo, False)
    sock = _connect(mirror, path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deadline = time.monotonic() + SEND_TIMEOUT * 4
    while time.monotonic() < deadline:  # 128 KiB a second
        assert sock.recv(64 << 10, socket.MSG_WAITALL)
        time.sleep(0.5)
    assert _established(sock)
    sock.close()
    assert "(server.send_timeout)" not in mirror.log_text()
