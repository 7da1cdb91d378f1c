"""
glibc's ``malloc``, told to keep the memory a message's buffers free.

A 100 KB message passes through a few buffers of its size on its way to the
spool: the socket's reads, the DATA buffer, the stored bytes, SQLite's copy.
By default glibc gives freed memory at the top of its heap back to the kernel
(``M_TRIM_THRESHOLD``, 128 KB to start with) and serves blocks above its mmap
threshold with fresh mappings, so the next message's buffers are fresh pages,
and every first touch of a page is a fault in which the kernel zeroes it.
Under the P1 benchmark that was a fifth of the reactor thread's time in the
kernel; keeping freed memory for the next message measured 5-10 % more
100 KB messages per second (``bench/README.md``).

``twistd mailhub`` calls :func:`keep_freed_memory` when it starts.  An
embedded hub leaves its host process's allocator alone: how that process uses
memory is its own business.

The price: memory freed after a burst of large messages stays with the
process (up to ``TRIM_THRESHOLD`` per malloc arena, and buffers under
``MMAP_THRESHOLD`` come from the heap) instead of going back to the kernel.
An operator who wants glibc's own behaviour, or other figures, sets glibc's
environment variables (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
see mallopt(3)) for the twistd process; with either of them set, the hub
leaves malloc as glibc set it from them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import Any

#: ``mallopt`` parameters, from glibc's ``<malloc.h>``.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap, and are reused once freed
#: (above it, a message is rare enough that a fresh mapping costs nothing
#: that matters).
MMAP_THRESHOLD = 4 * 1024 * 1024

#: Free memory at the top of a heap is given back to the kernel past this.
TRIM_THRESHOLD = 32 * 1024 * 1024


#: glibc's environment variables for these settings: the operator's word wins.
OPERATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory(libc: Any = None, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Set glibc's mmap and trim thresholds (see the module's docstring).

    :param libc: the C library (this process's own if ``None``).
    :param environ: the process's environment.
    :returns: whether both were set; ``False`` where the operator set them
        (``OPERATOR_SETTINGS``), or where there is no glibc ``mallopt``
        (musl, macOS), which changes nothing but speed.
    """
    if any(name in environ for name in OPERATOR_SETTINGS):
        return False
    if libc is None:
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
