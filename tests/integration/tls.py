"""The test CA and the certificate dockmirror's TLS listeners serve in the tests.

One CA per test run signs a certificate for ``localhost``, ``mirror.test``,
``127.0.0.1`` and ``::1``.  Clients are given this CA and verify the server
against it: curl (``--cacert``), skopeo (``--src-cert-dir``) and Python's
``ssl``.  Nothing trusts anything else, and nothing skips verification.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import tempfile
import threading
from pathlib import Path

from .clients import MIRROR_NAME, ServerTLS, make_server_tls

#: Test threads (e.g. 48 concurrent pulls) ask for these at once: one makes them.
_making = threading.Lock()


def server_tls() -> ServerTLS:
    """The run's CA and server certificate (made on first use, removed at exit)."""
    with _making:
        return _made()


@functools.cache
def _made() -> ServerTLS:
    directory = Path(tempfile.mkdtemp(prefix="dockmirror-test-tls-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    tls = make_server_tls(directory, MIRROR_NAME)
    (directory / "certs.d").mkdir()
    shutil.copy(tls.ca, directory / "certs.d" / "ca.crt")
    return tls


def cert_dir() -> Path:
    """A directory holding only the CA as ``ca.crt``, as skopeo's ``--*-cert-dir`` wants."""
    return server_tls().ca.parent / "certs.d"


def client_context() -> ssl.SSLContext:
    """A Python client context that verifies servers against the test CA only."""
    return ssl.create_default_context(cafile=str(server_tls().ca))
