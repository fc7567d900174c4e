"""/proc/PID/pagemap: the PAGEMAP_SCAN ioctl (Linux 6.7+) and the classic 64-bit entries."""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator

from .libc import iowr, libc

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# PAGEMAP_SCAN flags and page categories (include/uapi/linux/fs.h)
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7  # 6.8+

# Classic pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_SOFT_DIRTY = 1 << 55
PM_UFFD_WP = 1 << 57
PM_SWAPPED = 1 << 62
PM_PRESENT = 1 << 63


class PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


PAGEMAP_SCAN = iowr(ord("f"), 16, ctypes.sizeof(ScanArg))
_VEC_LEN = 4096


class Scanner:
    """PAGEMAP_SCAN over one process's pagemap, reusing one output buffer."""

    def __init__(self, pagemap_fd: int):
        self.fd = pagemap_fd
        self._vec = (PageRegion * _VEC_LEN)()

    def scan(self, start: int, end: int, *, flags: int = 0, category_mask: int = 0,
             anyof_mask: int = 0, return_mask: int = 0, inverted: int = 0) -> Iterator[tuple[int, int, int]]:
        """Yield (start, end, categories) of the matching regions in [start, end); categories
        in `inverted` must be absent where category_mask asks for them."""
        arg = ScanArg(size=ctypes.sizeof(ScanArg), flags=flags, end=end,
                      vec=ctypes.addressof(self._vec), vec_len=_VEC_LEN, category_inverted=inverted,
                      category_mask=category_mask, category_anyof_mask=anyof_mask,
                      return_mask=return_mask)
        while start < end:
            arg.start = start
            found = libc.ioctl(self.fd, PAGEMAP_SCAN, ctypes.addressof(arg))
            if found < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"PAGEMAP_SCAN {start:#x}-{end:#x}: {os.strerror(err)}")
            for region in self._vec[:found]:
                yield region.start, region.end, region.categories
            if arg.walk_end <= start:
                break
            start = arg.walk_end


def scan_supported() -> bool:
    """Whether this kernel has PAGEMAP_SCAN (it answers ENOTTY before 6.7)."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        list(Scanner(fd).scan(0, PAGE_SIZE, return_mask=PAGE_IS_PRESENT))
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            return False
        raise
    finally:
        os.close(fd)


def read_entries(pagemap_fd: int, start: int, end: int) -> list[int]:
    """The classic 64-bit pagemap entries of the pages in [start, end)."""
    count = (end - start) // PAGE_SIZE
    data = os.pread(pagemap_fd, count * 8, start // PAGE_SIZE * 8)
    return list(struct.unpack(f"{len(data) // 8}Q", data))


# A swapped entry's type (bits 0-4): the last type is the kernel's pte markers (SWP_PTE_MARKER),
# which uffd-wp leaves on never-populated and discarded pages; they read as "swapped".
PM_SWAP_TYPE_MASK = 0x1F
SWP_PTE_MARKER = 0x1F


def is_marker(entry: int) -> bool:
    return bool(entry & PM_SWAPPED) and entry & PM_SWAP_TYPE_MASK == SWP_PTE_MARKER


def scan_supports_soft_dirty() -> bool:
    """PAGE_IS_SOFT_DIRTY came in 6.8; older kernels reject the unknown category (EINVAL)."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        list(Scanner(fd).scan(0, PAGE_SIZE, category_mask=PAGE_IS_SOFT_DIRTY,
                              return_mask=PAGE_IS_SOFT_DIRTY))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
