"""shitu.runtime: glibc keeps large freed blocks for reuse instead of unmapping them."""

from __future__ import annotations

import ctypes
import sys

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_large_blocks_come_from_the_heap_and_stay_there() -> None:
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
