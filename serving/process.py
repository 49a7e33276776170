"""Process-wide settings for a serving process (what `mrl-serve` sets before it loads anything)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_ALLOCATION_BYTES = 256 * 1024


def return_freed_memory_to_the_os(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Serve every allocation of `threshold` bytes or more from its own mapping, so freeing it returns it.

    glibc raises this threshold by itself after each large free, up to 32 MiB; a request holding megabytes
    of text then leaves its copies in the heap, which keeps them (measured: +40 MB of RSS kept after a few
    1-15 MiB requests). A fixed threshold gives them back. Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to set
        log.debug("no mallopt in %s: freed memory is returned as the C library sees fit", name)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
