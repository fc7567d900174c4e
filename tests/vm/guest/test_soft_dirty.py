"""Soft-dirty works in the guest (the host kernel lacks MEM_SOFT_DIRTY)."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

PAGE = mmap.PAGESIZE
SOFT_DIRTY = 1 << 55


def soft_dirty(addr: int, pages: int) -> list[bool]:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        data = f.read(pages * 8)
    return [bool(v & SOFT_DIRTY) for v in struct.unpack(f"{pages}Q", data)]


def test_clear_refs_and_pagemap_bit_55() -> None:
    region = mmap.mmap(-1, 4 * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    for i in range(4):
        region[i * PAGE] = 1
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
        f.write("4")
    assert soft_dirty(addr, 4) == [False] * 4
    region[2 * PAGE] = 2
    assert soft_dirty(addr, 4) == [False, False, True, False]
