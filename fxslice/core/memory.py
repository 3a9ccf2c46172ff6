"""Giving freed host memory back to the system between steps.

A pass frees whole models' worth of tensors (a float64 copy, the weights it replaced), but glibc's allocator keeps
freed blocks of a few MB (most weight matrices) in its heap for reuse, and the process's resident memory never
comes down: on SmolLM2 a cleanup stage left 1 GB resident that no tensor held. `release_freed` asks the allocator
to return it (`malloc_trim`); callers invoke it where a step has just dropped large tensors (after each pass and
each recipe stage). Elsewhere than glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["release_freed", "return_large_blocks", "resident_bytes", "available_bytes"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed() -> None:
    """Return the allocator's free heap pages to the system (a few ms; none where the C library lacks it)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def return_large_blocks(size: int = 1 << 20) -> None:
    """Have every block of `size` bytes or more mapped on its own and given back to the system when freed (glibc's
    `M_MMAP_THRESHOLD`, which otherwise rises to the largest block freed so far and then keeps such blocks in the
    heap). A run whose weights are on disk reads, converts and drops a weight per op: with the default, the heap
    kept a fragment of each (a 4-layer model of d = 2048 peaked at 1.6 GB resident; with it, under 0.95 GB). The
    cost is fresh pages for each large block. Process-wide, once; nothing elsewhere than glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, size)


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux), or None where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def available_bytes() -> int | None:
    """Memory the system can give this process now without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
