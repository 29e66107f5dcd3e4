"""glibc's malloc on a CPU training host: keep freed memory for the next step.

On a CPU, torch takes every tensor from malloc. glibc serves each request over 32 MB (activations,
DeepSpeed's flat gradient partitions) with a fresh mmap and unmaps it when freed, so every training
step page-faults its large buffers in anew: B/16 in bf16 at batch 16, one process, 375k-583k
faults per step, which cost 1.24-1.27x in step time (docs/benchmarks.md, "Host memory"). With mmap
and trimming off, freed memory stays in the heap and the next step reuses it. (Threads other than
the main one allocate from arenas that still map requests beyond their 64 MB heaps; the training
step's large tensors come from the main thread.) GPUs need none of this (torch's caching allocator
does it for device memory), so only CPU training calls it.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
M_MMAP_MAX = -4


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc only


def keep_freed_memory() -> bool:
    """Make malloc keep what torch frees (no mmap per large tensor, no trim of the heap's top).
    The process's resident set then stays at its peak. Returns False where the C library has no
    mallopt (not glibc)."""
    libc = _libc()
    return libc is not None and libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS, so that the resident set rises again by what the
    next step touches (a CPU memory measurement starts here)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
