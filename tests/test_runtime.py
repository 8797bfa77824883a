"""shitu.runtime: glibc keeps large freed blocks for reuse instead of unmapping them."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from shitu.runtime import keep_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def check_large_blocks_stay_in_the_heap() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    size = 64 << 20  # above glibc's largest default mmap threshold (32 MiB)

    assert keep_freed_memory()
    mapped_before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    assert block
    assert libc.mallinfo2().hblkhd == mapped_before  # not a fresh mmap
    libc.free(block)
    assert libc.mallinfo2().fordblks >= size  # freed, yet still in the heap for reuse


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_large_blocks_come_from_the_heap_and_stay_there() -> None:
    # In a fresh interpreter, as a shitu command starts: after other tests' threads,
    # glibc may move this process's main thread to a thread arena, whose 64 MiB heaps
    # cannot hold the block, so it would be mapped whatever the setting.
    code = "from tests.test_runtime import check_large_blocks_stay_in_the_heap as c; c()"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
