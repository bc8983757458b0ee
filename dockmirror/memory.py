"""The C allocator's settings for a process that streams large bodies.

Every chunk of a body on its way through the mirror is a fresh buffer of
16 to 64 KiB (a socket read, a file read, TLS records) that is freed soon
after.  With glibc's defaults, freeing one at the top of the heap trims the
heap as soon as 128 KiB are free there, and larger buffers are mapped and
unmapped one by one, so the next chunk gets new pages from the kernel: a
page fault and a page cleared per 4 KiB, on the reactor thread, for every
chunk.  :func:`tune_allocator` keeps up to :data:`TRIM_THRESHOLD` bytes free
at the top of the heap, and takes buffers under :data:`MMAP_THRESHOLD`
from the heap, so they reuse the same pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from twisted.logger import Logger

log = Logger()

#: glibc's ``mallopt`` parameters (``<malloc.h>``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Bytes free at the top of the heap before it is given back to the kernel.
TRIM_THRESHOLD = 32 << 20
#: Allocations from this size on are mapped on their own.
MMAP_THRESHOLD = 4 << 20


def tune_allocator() -> bool:
    """Set the thresholds on glibc's allocator; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    # musl has a mallopt that does nothing: only glibc's is called.
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if not done:
        log.warn("could not set the allocator's thresholds: large bodies cost page faults")
    return bool(done)
