"""Secret files in the state directory: created once, readable by their owner only."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger

log = Logger()


def make_private_directory(directory: Path) -> None:
    """Create *directory* (and its parents) as owner-only if it does not exist."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def load_or_create(path: Path, generate: Callable[[], bytes]) -> bytes:
    """The contents of *path*, writing ``generate()`` there (mode 0600) first if missing.

    The new file is written aside and linked into place, so a reader never
    sees it half written, and of two processes starting at once both end up
    with the same secret.
    """
    try:
        return read(path)
    except FileNotFoundError:
        pass
    temporary = _write_aside(path, generate())
    try:
        os.link(temporary, path)
        log.info("created {path}", path=str(path))
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)
    return read(path)


def replace(path: Path, data: bytes) -> None:
    """Make *data* the contents of *path* (mode 0600), atomically, unless they are already."""
    try:
        if read(path) == data:
            return
    except FileNotFoundError:
        pass
    temporary = _write_aside(path, data)
    try:
        os.replace(temporary, path)
    except OSError:
        os.unlink(temporary)
        raise


def _write_aside(path: Path, data: bytes) -> str:
    """A new owner-only file next to *path* holding *data*, synced; its name."""
    make_private_directory(path.parent)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def read(path: Path) -> bytes:
    """The contents of the secret file *path*; a warning if others may use it."""
    with path.open("rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warn(
                "{path} is accessible to other users (mode {mode:o}); chmod 600 it",
                path=str(path),
                mode=stat.S_IMODE(mode),
            )
        return f.read()
