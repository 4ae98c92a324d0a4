"""Keep freed CPU memory in the process for the next step instead of handing it to the kernel.

glibc's malloc serves large blocks (the dense word-embedding gradient, 47 MB for MiniLM; the
autocast copies of weights; matmul outputs above its mmap threshold) with fresh `mmap`s and
unmaps them when freed, so every training step page-faults them in again and zeroes them: on the
2-core bench machine that was ~10% of a MiniLM step (docs/performance.md). `keep_freed_memory`
sets glibc's own tunables (mallopt: no mmap for blocks, trim the heap only above 1 GiB free),
what PyTorch's CPU tuning guide gets from preloading jemalloc or tcmalloc, without either. The
process keeps the memory it freed for reuse (peak memory measured +2% for MiniLM training, +8-12%
for the MobileNetV2 image bench). Not glibc (macOS, musl) or `speed.keep_freed_memory=false`
(speed/switches.py): nothing changes.
"""

from __future__ import annotations

import ctypes
import functools

from finetune_budget.speed.switches import enabled

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set the tunables once per process; True when they are in effect."""
    if not enabled("keep_freed_memory"):
        return False
    libc = ctypes.CDLL(None)  # the C library this process runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: others have other tunables
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
