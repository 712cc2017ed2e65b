"""Host-process settings for CPU serving: the allocator, the garbage collector, OpenMP's wait policy and huge pages
for the packed weights.

glibc's malloc hands blocks above its mmap threshold (dynamic, 128 KiB up to 32 MiB) to fresh mmaps and gives
freed heap tops back to the kernel past a trim threshold; every engine step allocates the same few-MiB
activations and logits again, so each one is page-faulted and zeroed anew: a 16-row sampling step took 2.2 ms
instead of 1.0 (bench/cpu_sampler.py with and without --no-tune-allocator; bench/results/s6/README.md).
Fixing both thresholds keeps freed blocks in the heap for the next step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from typing import MutableMapping

log = logging.getLogger(__name__)

# libgomp's threads spin this many times at a barrier before they sleep. Its default (300,000 spins, a few
# milliseconds) is right on cores nobody else wants, and a disaster when anything else runs beside the kernels'
# threads (the API process, a neighbour's job): a thread that spins holds a core the preempted thread it waits for
# could run on, so every parallel region of a step can cost a scheduler time slice. bench/omp_wait.sh: one busy
# process in another session made the served workload's run take > 150 s instead of 6 s with the default; with
# 5,000 spins 17 s, at 97% of the default's speed on idle cores (passive, i.e. no spinning: 73%).
OMP_SPIN_COUNT = 5000

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit: larger requests are still mmapped
TRIM_THRESHOLD = 512 << 20  # heap bytes kept past the top before returning them to the kernel

# Linux's madvise advice for transparent huge pages, and their size on x86-64. Decode streams every packed expert
# weight once a step; on 4 KiB pages the CPU's prefetchers stop at every page and its TLB misses every 4 KiB: the
# VNNI tiles read 150-220 MB of Q4_K / Q6_K rows at 17-18 GB/s with 2 threads on the AMX box, 21-24 GB/s from
# 2 MiB pages (the plain 2-thread read: 20-22; bench/results/s19/README.md).
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


def tune_allocator() -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process; False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the thresholds")
    return ok


def advise_huge_pages(addr: int, nbytes: int) -> bool:
    """Ask Linux to back the 2 MiB-aligned interior of [addr, addr + nbytes) with transparent huge pages (their
    `enabled` setting is `always` or, as usual, `madvise`); call it before the memory is first written (a fresh
    large allocation), as pages faulted in later come as huge ones. False where nothing was advised (under 2 MiB
    aligned, no libc, not Linux, the kernel refused)."""
    start = (addr + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (addr + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise(start, end - start, MADV_HUGEPAGE) == 0


def tune_openmp_wait(environ: MutableMapping[str, str]) -> bool:
    """Set libgomp's spin count (OMP_SPIN_COUNT) in `environ` unless the user chose a wait policy or spin count
    there; libgomp reads it once, when it loads, so this must run before torch or a kernel library loads in the
    process (the engine and worker processes call it first thing). Returns whether it set anything."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = str(OMP_SPIN_COUNT)
    return True


def freeze_startup_objects() -> None:
    """Move everything allocated so far (modules, the model's Python objects) out of the collector's view, so
    the collections that steps trigger do not walk them again (Python's gc was 5% of a long prefill's time)."""
    gc.collect()
    gc.freeze()
