"""Opt-in tuning of glibc's allocator for large CPU tensors.

By default glibc serves blocks over 32 MB with mmap and returns them to the OS on free, so every
new activation of that size (a (32, 256, 1152) fp32 tensor is 37.7 MB) pays page faults on
first touch, several times the cost of the copy itself (README, "CPU performance notes").
Raising the mmap and trim thresholds keeps such blocks in the heap for
reuse. The cost: freed memory up to `trim_threshold` stays with the process instead of going
back to the OS. Equivalent environment setting, applied before Python starts:
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824
"""

from __future__ import annotations

import ctypes
import ctypes.util

from .errors import ArgumentError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_cpu_allocator(mmap_threshold: int = 1 << 28, trim_threshold: int = 1 << 30) -> bool:
    """Set glibc's mmap/trim thresholds (bytes) for this process. Returns False, changing
    nothing, where the C library is not glibc."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ArgumentError(f"{name}: expected a positive int (bytes), got {value!r}")
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 2**31 - 1)) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1
