"""Keep freed memory in the process: glibc's malloc settings that spare a training step its page faults.

By default glibc serves every allocation above 128 KiB-32 MiB (a threshold it raises as it
goes) with a fresh ``mmap`` and gives it back on free, so the activation buffers of each training
step are new pages that fault in again, 4 KiB at a time: on the 2-core development CPUs that was
a quarter of a bf16 step, varying with the heap's history. ``keep_freed_memory`` asks malloc to
serve large blocks from the heap and never trim it, the same as
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment. The price is that
the process keeps its peak memory until it exits, which suits a training run.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it; True when applied (False without glibc)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
