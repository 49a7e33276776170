"""Process and thread settings of a serving process: how memory goes back to the OS, who gets the CPU first."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def lower_thread_priority(niceness: int) -> None:
    """Give the calling thread (and the threads it starts later) a higher nice value: it yields the CPU.

    Inference threads run at `niceness` so the event loop, which parses requests, answers health and
    refuses what it must, gets a core as soon as it has work, however busy the model is. On Linux a
    thread's nice value is its own; elsewhere this does nothing.
    """
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except OSError as e:  # a sandbox may forbid it: the server still works, with less responsive refusals
        log.debug("could not lower the priority of %s: %s", threading.current_thread().name, e)
