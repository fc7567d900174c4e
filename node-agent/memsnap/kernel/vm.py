"""process_vm_readv(2): copy another process's memory without stopping it."""
from __future__ import annotations

import ctypes

from .arch import ARCH
from .libc import IoVec, syscall

IOV_MAX = 1024


def read_ranges(pid: int, ranges: list[tuple[int, int]], into: ctypes.Array, offset: int = 0) -> int:
    """Copy the remote [start, end) ranges back to back into `into` from `offset`; returns bytes
    read (less than asked when a range was unmapped meanwhile: the read stops there)."""
    total = 0
    base = ctypes.addressof(into) + offset
    for batch_start in range(0, len(ranges), IOV_MAX):
        batch = ranges[batch_start:batch_start + IOV_MAX]
        n = len(batch)
        local = (IoVec * 1)(IoVec(base + total, sum(e - s for s, e in batch)))
        remote = (IoVec * n)(*(IoVec(s, e - s) for s, e in batch))
        got = syscall(ARCH.nr["process_vm_readv"], pid, ctypes.addressof(local), 1,
                      ctypes.addressof(remote), n, 0, what=f"process_vm_readv({pid})")
        total += got
        if got < local[0].len:
            break
    return total
