"""Blocking file operations of the cache, each run in a worker thread.

The cache holds private upstreams' layers: its files are made 0640 and its
directories 0750, readable by the service's group only, whatever the umask.
"""

from __future__ import annotations

import errno
import os

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
FILE_MODE = 0o640
DIRECTORY_MODE = 0o750


def create(path: str) -> int:
    """A new file open for writing; fails if *path* exists."""
    return os.open(path, _FLAGS, FILE_MODE)


def create_fill(path: str, readable: bool = False) -> int:
    """A fill's new temporary file ``HEX.UNIQUE``, once earlier ones of that digest are gone.

    The caller holds the digest's claim, so any other is a dead fill's.
    A *readable* file is open for reading too.
    """
    directory, name = os.path.split(path)
    prefix = name.partition(".")[0] + "."
    for entry in os.scandir(directory):
        if entry.name.startswith(prefix):
            remove(entry.path)
    if readable:
        return os.open(path, _FLAGS & ~os.O_WRONLY | os.O_RDWR, FILE_MODE)
    return create(path)


def make_directory(path: str) -> None:
    """Make *path* and any missing parent directory, each 0750; what exists is made so too."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        make_directory(parent)
    try:
        os.mkdir(path, DIRECTORY_MODE)
    except FileExistsError:
        restrict(path, DIRECTORY_MODE)


def restrict(path: str, mode: int) -> None:
    """Take from *path* the permissions beyond *mode* (as an earlier version made it)."""
    current = os.stat(path).st_mode & 0o777
    if current & ~mode:
        os.chmod(path, current & mode)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def install(fd: int, temp_path: str, final_path: str) -> None:
    """Make a written file durable, then give it its final name.

    The rename is atomic and comes after the fsync, so after a crash at any
    moment the final name holds the whole file or nothing.
    """
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    directory = os.path.dirname(final_path)
    if not os.path.isdir(directory):
        make_directory(directory)
    os.replace(temp_path, final_path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_file(temp_path: str, final_path: str, data: bytes) -> None:
    fd = create(temp_path)
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        remove(temp_path)
        raise
    install(fd, temp_path, final_path)


def discard(fd: int | None, path: str) -> None:
    """Close and remove an unfinished file."""
    if fd is not None:
        os.close(fd)
    remove(path)


def remove(path: str) -> bool:
    """Remove a file, or an empty directory; what is already gone is fine.

    Returns whether this call removed it.
    """
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        try:
            os.rmdir(path)
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            return False
    return True
