"""How the process gets memory for tensors: freed blocks are kept for the next ones.

torch takes every CPU tensor from the C library's malloc. glibc's malloc serves a block above its
mmap threshold (128 kB to 32 MB, moving) with a fresh mapping and gives it back to the kernel on
free, and trims the heap's free top likewise; the next tensor of that size then faults its pages
in again, each zeroed by the kernel. A batched prefill makes and frees tensors of tens of MB in
every layer (8 prefixes of 389 positions: up to 38 MB for one MLP product), so that churn took a
quarter of a 60-item `bench mmau` (15 s of system time, against about 1 s with blocks kept).
Raising both thresholds keeps those blocks in the heap for reuse; peak memory stays what the
largest step needs. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MAPPED_ABOVE = 32 * 1024 * 1024  # blocks up to this size come from the heap (glibc's 64-bit maximum)
TRIM_ABOVE = 256 * 1024 * 1024  # this much free memory may stay at the heap's top

_done: list[bool] = []


def keep_freed_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; whether it took."""
    if not _done:
        _done.append(_mallopt())
    return _done[0]


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (macOS, Windows, musl without mallopt)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MAPPED_ABOVE)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))
