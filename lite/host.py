"""Process-wide settings of the host machine that entry points (train.py, serve.py, benchmarks) make
once, before JAX starts its CPU backend."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Keep the memory XLA:CPU frees for its next allocations instead of returning it to the OS ->
    whether glibc took the settings (False elsewhere, e.g. macOS or musl: nothing changes).

    XLA:CPU allocates every buffer of a step afresh. glibc serves large allocations with their own
    mmap and hands freed heap tops back, and its per-thread arenas shrink: each step then faults
    every page of its buffers in again. The demo training step on 2 cores took 120k page faults and
    0.36 s of kernel time per 0.83 s step; with one arena, no mmap and no trimming, 7k and 0.03 s,
    and the step 1.3x faster. The process keeps its peak heap (a few hundred MB for the demo).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1),  # every thread allocates from the main heap, which never shrinks below...
                (_M_TRIM_THRESHOLD, 2**31 - 1),  # ... 2 GiB of free top, ...
                (_M_MMAP_MAX, 0))  # ... and holds large buffers too (no mmap of their own)
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
