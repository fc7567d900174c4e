"""Making a chain's in-parent pages lazy, so `criu restore --lazy-pages` skips them.

CRIU's restore skips only entries flagged PE_LAZY and reads every PE_PARENT entry from the
parent layers before the task runs: the pre-copied memory, i.e. nearly all of it. Flagging
those entries PE_LAZY as well makes the restore leave them to the lazy-pages daemon, which
reads them through the parent chain (node-agent/criu/patches/0003 lets it copy such pages in).
Only what CRIU itself would dump as lazy qualifies: private anonymous memory (not locked, not
hugetlb, not vDSO/vvar/vsyscall), never the page a thread's stack pointer is in.
"""
from __future__ import annotations

import bisect
from pathlib import Path

from ..images import criu_format as cf
from ..kernel.pagemap import PAGE_SIZE

MAP_PRIVATE, MAP_ANONYMOUS, MAP_LOCKED, MAP_HUGETLB = 0x02, 0x20, 0x2000, 0x40000
VMA_AREA_VSYSCALL, VMA_AREA_VDSO, VMA_AREA_VVAR = 1 << 2, 1 << 3, 1 << 12


def mark_parent_pages_lazy(directory: Path) -> int:
    """Flag the in-parent entries of every task's pagemap in directory PE_LAZY where CRIU may
    fill them lazily (entries split at the limits); returns the number of pages flagged."""
    stack_pages = _stack_pages(directory)
    flagged = 0
    for pid in cf.pagemap_pids(directory):
        path = cf.pagemap_path(directory, pid)
        pagemap = cf.read_pagemap(path)
        lazy = _lazy_ranges(directory / f"mm-{pid}.img", stack_pages)
        entries, n = _split_and_flag(pagemap.entries, lazy)
        if n:
            pagemap.entries = entries
            cf.write_pagemap(path, pagemap)
            flagged += n
    return flagged


def _lazy_ranges(mm_image: Path, stack_pages: set[int]) -> list[tuple[int, int]]:
    """[start, end) ranges CRIU registers for lazy restore, minus the stack-pointer pages."""
    ranges = []
    for vma in _load(mm_image)["entries"][0].get("vmas", []):
        if not _can_be_lazy(int(vma["flags"]), int(vma["status"])):
            continue
        start, end = int(vma["start"]), int(vma["end"])
        for sp in sorted(p for p in stack_pages if start <= p < end):
            if sp > start:
                ranges.append((start, sp))
            start = sp + PAGE_SIZE
        if start < end:
            ranges.append((start, end))
    return ranges


def _can_be_lazy(flags: int, status: int) -> bool:
    """As CRIU's vma_entry_can_be_lazy()."""
    return (flags & MAP_ANONYMOUS and flags & MAP_PRIVATE and not flags & (MAP_LOCKED | MAP_HUGETLB)
            and not status & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL))


def _split_and_flag(entries, lazy: list[tuple[int, int]]):
    """Entries with every in-parent part that lies in a lazy range flagged PE_LAZY."""
    out, flagged = [], 0
    lazy = sorted(lazy)
    ends = [hi for _, hi in lazy]
    for vaddr, nr, flags in entries:
        if not flags & cf.PE_PARENT or flags & cf.PE_LAZY:
            out.append((vaddr, nr, flags))
            continue
        for start, end, is_lazy in _cut(vaddr, vaddr + nr * PAGE_SIZE, lazy, ends):
            pages = (end - start) // PAGE_SIZE
            out.append((start, pages, flags | cf.PE_LAZY if is_lazy else flags))
            flagged += pages if is_lazy else 0
    return out, flagged


def _cut(start: int, end: int, lazy: list[tuple[int, int]], ends: list[int]):
    """[start, end) as consecutive (start, end, inside a lazy range) pieces; lazy is sorted
    and disjoint, ends its ends: the first range that can overlap is found by bisection (a
    top layer has an entry per run of written pages, thousands at 4 GiB)."""
    pos = start
    i = bisect.bisect_right(ends, start)
    while i < len(lazy) and lazy[i][0] < end:
        lo, hi = max(lazy[i][0], start), min(lazy[i][1], end)
        if pos < lo:
            yield pos, lo, False
        yield lo, hi, True
        pos = hi
        i += 1
    if pos < end:
        yield pos, end, False


def _stack_pages(directory: Path) -> set[int]:
    """The page each thread's stack pointer is in (CRIU never restores those lazily)."""
    pages = set()
    for core in directory.glob("core-*.img"):
        regs = _load(core)["entries"][0].get("thread_info", {}).get("gpregs", {})
        if "sp" in regs:
            pages.add(int(regs["sp"]) & ~(PAGE_SIZE - 1))
    return pages


def _load(path: Path) -> dict:
    with open(path, "rb") as f:
        return cf._pycriu().load(f)
