"""Keep the resident memory of long slide-reading runs flat.

glibc serves allocations above its mmap threshold (128 KiB) with ``mmap`` and returns them to the system
when freed, but it *raises* that threshold each time such a block is freed (up to 32 MiB). After the first
freed patch buffer, every later patch, chunk and batch (0.2-30 MB each) comes from the heap instead, and
the heap cannot shrink around live blocks: resident memory grows with the number of patches read
(measured: +1.2 GB over 1,575 patches of one slide). Setting the threshold explicitly turns the adjustment
off; at 1 MiB, batches and whole-level strips go to ``mmap`` while patches and cache chunks (< 1 MiB) stay
on the heap, where they recycle each other's blocks: memory plateaus after a few batches at the speed of
the default (128 KiB pinned is flat too but costs about 15% read speed in page faults). No library exposes
this, hence the few lines of ctypes below.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 1024 * 1024
_done = False


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process (once; a no-op elsewhere or when the user set
    ``MALLOC_MMAP_THRESHOLD_``). Returns True when the threshold is pinned."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    _done = ok
    if ok:
        logger.debug("glibc mmap threshold pinned at %d bytes", threshold)
    return ok
