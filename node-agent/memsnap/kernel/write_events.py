"""Mark memory for write reporting: the memsnap madvise() advices.

``MADV_MEMSNAP`` marks a range and write-protects it, so the first write to
each page fires ``memsnap:page_written``; on a marked range it re-arms it.
``MADV_NOMEMSNAP`` unmarks.  For another process the same advices go
through ``process_madvise()``, which needs PTRACE_MODE_READ over the target
and CAP_SYS_NICE (root has both).  See kernel/README.md.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

from .arch import ARCH
from .libc import libc as _libc
from .libc import IoVec, syscall

MADV_MEMSNAP = 120
MADV_NOMEMSNAP = 121

_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


Range = tuple[int, int]  # (start address, length in bytes)


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise() on the calling process."""
    if _libc.madvise(addr, length, advice) != 0:
        _raise_errno(f"madvise({addr:#x}, {length}, {advice})")


def mark_self(addr: int, length: int) -> None:
    """Mark (or re-arm) a range of the calling process."""
    madvise(addr, length, MADV_MEMSNAP)


def unmark_self(addr: int, length: int) -> None:
    madvise(addr, length, MADV_NOMEMSNAP)


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid``; close it with os.close()."""
    return os.pidfd_open(pid)


def process_madvise(pidfd: int, ranges: Sequence[Range], advice: int) -> int:
    """process_madvise() over ``ranges``; returns the number of bytes advised.

    The kernel stops at the first range it cannot advise and returns how far
    it got; it fails only if it got nowhere.
    """
    iov = (IoVec * len(ranges))(*(IoVec(start, length) for start, length in ranges))
    return syscall(ARCH.nr["process_madvise"], pidfd, ctypes.addressof(iov), len(ranges), advice, 0,
                   what=f"process_madvise(advice={advice})")


def _advise_all(pidfd: int, ranges: Sequence[Range], advice: int) -> None:
    total = sum(length for _, length in ranges)
    done = process_madvise(pidfd, ranges, advice)
    if done != total:
        raise OSError(f"process_madvise(advice={advice}) stopped after {done} of {total} bytes")


def mark(pidfd: int, ranges: Sequence[Range]) -> None:
    """Mark (or re-arm) ranges of another process; all or raise."""
    _advise_all(pidfd, ranges, MADV_MEMSNAP)


def unmark(pidfd: int, ranges: Sequence[Range]) -> None:
    _advise_all(pidfd, ranges, MADV_NOMEMSNAP)
