"""Keep the memory a CPU step frees inside the process, so the next step reuses its pages.

On CPU the compiled step's buffers are host memory from glibc's malloc. By default glibc hands large blocks
straight back to the kernel: a block over its (dynamic, at most 32 MB) mmap threshold is unmapped when freed,
the top of a heap past the trim threshold is returned, and a per-thread heap whose memory is all free is
deleted. The next step then faults every page of its buffers in afresh, and the kernel zeroes each one. On
the 2-core VMs this project is measured on a fault costs 2-8 us, 20-27 us in a step's first runs: a
prompt-logprob step of SmolLM2 (128 rows of float32 logits, ~25 MB) took ~6,300 faults and 50-100 ms where the
same step without faults takes ~45 ms, its first runs after a start up to 280 ms (bench/notes.md, session 19).

`retain_freed_memory()` sets glibc's limits (`mallopt`) so freed memory stays in the process: no trimming,
blocks up to 1 GiB from the heaps instead of their own mappings, and a top pad above the per-thread heap size
so those heaps are never deleted. The cost: the process's resident memory stays at its peak (it is reused,
not returned). Blocks above 1 GiB, and blocks above a per-thread heap's 64 MB on threads other than the main
one, are still mapped per allocation. It is process-wide and cannot be undone by this module; it is a no-op
(False) where the C library is not glibc. Host code: no jax.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("sgl_jax.engine")

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 1 << 30  # blocks up to this come from the heaps
TOP_PAD = 256 << 20  # > HEAP_MAX_SIZE (64 MB): a per-thread heap is never deleted

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (see the module docstring). True once applied (idempotent);
    False where it cannot be (not glibc, or mallopt refused a setting -- logged)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TOP_PAD, TOP_PAD), (M_TRIM_THRESHOLD, -1))  # -1: never trim
    refused = [param for param, value in settings if mallopt(param, value) != 1]
    if refused:
        log.warning("glibc mallopt refused parameters %s: freed memory may still be returned to the kernel", refused)
        return False
    _applied = True
    return True
