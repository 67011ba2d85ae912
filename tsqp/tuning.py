"""Process settings for the TEE and the server, applied once their start-up allocations are over.

Large tensors are allocated and freed on every call (results copied out of the arena, scores,
activations). glibc serves allocations over 32 MiB with a fresh mmap each time, so every such
tensor pays its page faults again: a 128 MB copy ran at 1.7 GB/s instead of 10 GB/s here. Keeping
them in the heap and not trimming it makes the pages stay mapped between calls. Applied before
start-up (loading weights, computing verification keys), the same setting would keep every transient
copy of a weight: the TEE's peak RSS went from 1.3 to 3.4 GB.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """True when glibc took the settings (a no-op elsewhere, e.g. musl or macOS)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
