"""soft-dirty backend: /proc/PID/clear_refs and the pagemap soft-dirty bit (x86, ppc64, s390).

Reading the bits and clearing them are two steps, and a write between them would be lost, so
each round holds the target's threads in a ptrace stop for the read-and-clear (microseconds
to milliseconds, by the size of the page tables). Writes the kernel makes for the target
during that window still land on dirty bits after the clear and are seen next round.
"""
from __future__ import annotations

import ctypes
import mmap
import os

from .. import remote
from ..kernel import pagemap
from ..kernel.pagemap import PAGE_IS_PRESENT, PAGE_IS_SOFT_DIRTY, PAGE_IS_SWAPPED, PAGE_SIZE
from .base import Availability, Backend, ProcessSample, TargetGone, TrackingError
from .pages import PageRanges

CLEAR_SOFT_DIRTY = b"4"


class SoftDirty(Backend):
    name = "soft-dirty"

    def __init__(self, pid, selection):
        super().__init__(pid, selection)
        self._pagemap = -1
        self._use_scan = pagemap.scan_supports_soft_dirty()

    @classmethod
    def availability(cls) -> Availability:
        if kernel_has_soft_dirty():
            return Availability(True, "pagemap reports soft-dirty bits (CONFIG_MEM_SOFT_DIRTY)")
        return Availability(False, "the kernel lacks soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY "
                                   "is off, or the architecture has none, e.g. arm64)")

    def _arm(self) -> PageRanges:
        self._pagemap = self.open_pagemap()
        with self._frozen():
            self.tracked, _ = self.refresh_vmas()
            baseline = self._pages(PAGE_IS_PRESENT | PAGE_IS_SWAPPED, dirty_only=False)
            self._clear()
        return baseline

    def collect(self) -> ProcessSample:
        with self._frozen():
            self.tracked, events = self.refresh_vmas()
            dirty = self._pages(PAGE_IS_PRESENT | PAGE_IS_SWAPPED, dirty_only=True)
            self._clear()
        return ProcessSample(self.pid, dirty, self.tracked, events)

    def close(self) -> None:
        # clear_refs leaves nothing behind that needs undoing.
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1
        self.release_claim()

    def _frozen(self):
        try:
            return remote.frozen_threads(self.pid)
        except remote.RemoteError as exc:
            if "no process" in str(exc) or "exited" in str(exc):
                raise TargetGone(str(exc)) from None
            raise TrackingError(str(exc)) from None

    def _clear(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "wb", buffering=0) as f:
            f.write(CLEAR_SOFT_DIRTY)

    def _pages(self, anyof: int, dirty_only: bool) -> PageRanges:
        """Pages with data in the tracked VMAs; with dirty_only, just the soft-dirty ones."""
        found = []
        for m in self.tracked:
            if self._use_scan:
                scanner = pagemap.Scanner(self._pagemap)
                found += [(s, e) for s, e, _ in scanner.scan(
                    m.start, m.end, category_mask=PAGE_IS_SOFT_DIRTY if dirty_only else 0,
                    anyof_mask=anyof, return_mask=anyof)]
            else:
                found += _pages_from_entries(self._pagemap, m.start, m.end, dirty_only)
        return PageRanges(found)


def _pages_from_entries(fd: int, start: int, end: int, dirty_only: bool) -> list[tuple[int, int]]:
    want = pagemap.PM_SOFT_DIRTY if dirty_only else 0
    data = pagemap.PM_PRESENT | pagemap.PM_SWAPPED
    return [(addr, addr + PAGE_SIZE)
            for addr, entry in zip(range(start, end, PAGE_SIZE), pagemap.read_entries(fd, start, end))
            if entry & data and entry & want == want]


def kernel_has_soft_dirty() -> bool:
    """Write a page, clear our own soft-dirty bits, write again: the bit must come back."""
    page = mmap.mmap(-1, PAGE_SIZE)
    try:
        page[0] = 1
        with open("/proc/self/clear_refs", "wb", buffering=0) as f:
            f.write(CLEAR_SOFT_DIRTY)
        page[0] = 2
        view = ctypes.c_char.from_buffer(page)
        addr = ctypes.addressof(view)
        del view  # the mmap cannot close while a buffer export is alive
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            entry = pagemap.read_entries(fd, addr, addr + PAGE_SIZE)[0]
        finally:
            os.close(fd)
        return bool(entry & pagemap.PM_SOFT_DIRTY)
    except OSError:
        return False
    finally:
        page.close()
