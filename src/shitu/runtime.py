"""Process-wide settings that make torch fast on a plain CPU.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to 32 MiB at
most) with a fresh `mmap` and unmaps it on free, and trims the heap top as soon as 128 KiB
lie free there. torch's CPU kernels allocate and free activation tensors of many MB per
layer, so each forward pass page-faults all of them back in. On a 2-core machine `shitu
eval -c GroceryStore_EfficientNetLite0` spent more time in the kernel than computing (108 s,
124 s system against 74 s user) and takes 33 s with freed memory kept for reuse; training
steps gain 1.1-1.5x (benchmarks/train_throughput.py --allocator keep glibc). The price is
that the process keeps its peak heap resident.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

from shitu.errors import ConfigError

logger = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

_LARGEST = 2**31 - 1  # mallopt takes an int
_TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps rather than page by page


def usable_cores() -> int | None:
    """The CPU cores this process may run on (its affinity, as a container's CPU set limits
    it), else the machine's; None where unknown."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# More threads than any CPU runs at once: each costs memory (its stack, onnxruntime's
# pools), and `--threads 100000` started 15,000 of them, 16 GB, before it was stopped.
MAX_THREADS = 1024


def check_thread_count(value: int, name: str) -> None:
    """A ConfigError naming `name` for a thread count over MAX_THREADS (counts over the
    cores are only warned of: they slow inference, but a 10 from a PaddleClas config
    works)."""
    if value > MAX_THREADS:
        raise ConfigError(
            f"{name}: {value} threads is more than any CPU runs at once (at most "
            f"{MAX_THREADS}; this process may use {usable_cores()} cores)"
        )


def keep_freed_memory() -> bool:
    """Let glibc reuse freed large blocks instead of returning them to the kernel.

    Returns whether the settings were applied: False off Linux/glibc (other allocators
    differ and are left alone). Affects allocations made after the call.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:  # the C library is already loaded: look it up in the process, no ldconfig call
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # a C library without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, _LARGEST),
            (M_TRIM_THRESHOLD, _LARGEST),
            (M_TOP_PAD, _TOP_PAD),
        )
    )
    logger.info("malloc keeps freed memory for reuse: %s", applied)
    return applied
