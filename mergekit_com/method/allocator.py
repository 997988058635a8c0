"""glibc's malloc thresholds for a merge process.

glibc hands an allocation above its mmap threshold (128 KiB at start) fresh pages from
the kernel and unmaps them when it is freed, and gives back free memory at the top of its
heap above the trim threshold (twice the other). It raises both as blocks are freed, the
mmap threshold to the largest freed block of at most 32 MiB, so a process that has run a
large forward ends near where ``tune_malloc`` starts; until then, each activation of a
forward (hundreds of KB to tens of MB) is faulted in page by page anew. The tiny zoo's
forward over its calibration took 0.067-0.104 s in fresh processes and 0.044-0.065 s
with these thresholds (``docs/scaling.md``). Blocks above 32 MiB still come and go
through ``mmap``, and at most 64 MiB of free memory stays at the top of the heap.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

LOG = logging.getLogger("mergekit.chain_of_merges.allocator")  # under mergekit's logger

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the threshold it raises by itself
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # glibc keeps this ratio when it raises them
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
# a user's own settings, read by glibc at start: left as they are
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")

_tuned = None


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds for the rest of this process (once; glibc
    only, and not where the environment sets either). Returns whether they are set."""
    global _tuned
    if _tuned is None:
        _tuned = _set_thresholds()
    return _tuned


def _set_thresholds() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(v) for v in USER_SETTINGS) or any(t in tunables for t in USER_TUNABLES):
        LOG.debug("malloc thresholds set by the environment: left as they are")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
