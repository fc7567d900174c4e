"""tracepoint backend: memsnap's kernel patch (kernel/README.md) reports first writes as events.

The tracker marks the target's VMAs through process_madvise(MADV_MEMSNAP) (no ptrace, no fd in
the target); the kernel write-protects them and records `memsnap:page_written` for the first
write to each page in a tracefs instance of this tracker process. A round re-arms every
marked VMA (again MADV_MEMSNAP) and reads the events. Every event carries a per-address-space
sequence number: a write whose number is below the re-arm of its own VMA belongs to the round
that re-arm closed, one above it to the next round (the VMAs are re-armed one after the other,
so the cut is per VMA, never one number for the whole process). A write whose VMA was not
re-armed counts in this round and the next. A gap in the numbers, or a ring-buffer overrun,
means events were lost: the whole marked memory then counts as written for the round
(over-reporting, never under-reporting), and the round says so (`lost`).
"""
from __future__ import annotations

import bisect
import errno
import os
import time

from ..kernel import pagemap, tracefs, write_events
from ..kernel.pagemap import PAGE_IS_PRESENT, PAGE_IS_SWAPPED
from ..procfs import Mapping
from .base import Availability, Backend, ProcessSample, TargetGone, TrackingError
from .pages import PageRanges
from .state import TargetState
from .vmas import VmaEvent, VmaSelection

DEFAULT_BUFFER_KB = 4096  # per CPU; MEMSNAP_TRACE_BUFFER_KB overrides


class _Hub:
    """This process's tracefs instance, shared by all its tracepoint trackers.

    Events are read once and handed to the tracker of their pid; the instance's filter lets
    only tracked pids through (a filtered event still takes its sequence number, so changing
    the filter can only ever look like a loss, never hide one).
    """

    _current: _Hub | None = None

    def __init__(self):
        size = int(os.environ.get("MEMSNAP_TRACE_BUFFER_KB", DEFAULT_BUFFER_KB))
        self.instance = tracefs.Instance.create(f"memsnap-tracker-{os.getpid()}", buffer_kb=size)
        self.reader = tracefs.RawReader(self.instance)
        self.inbox: dict[int, list[tracefs.Event]] = {}
        self.lost_total = 0

    @classmethod
    def get(cls) -> _Hub:
        if cls._current is None:
            cls._current = cls()
        return cls._current

    def add(self, pid: int) -> None:
        self.inbox.setdefault(pid, [])
        self._set_filter()

    def remove(self, pid: int) -> None:
        self.inbox.pop(pid, None)
        if self.inbox:
            self._set_filter()
        else:
            self.reader.close()
            self.instance.remove()
            _Hub._current = None

    def _set_filter(self) -> None:
        expr = " || ".join(f"pid == {pid}" for pid in sorted(self.inbox))
        (self.instance.path / "events" / tracefs.SYSTEM / "filter").write_text(expr or "0")

    def pump(self) -> bool:
        """Read what the kernel recorded into the inboxes; True if the buffers lost any."""
        for e in self.reader.read_events():
            if e.pid in self.inbox:
                self.inbox[e.pid].append(e)
        lost = self.instance.lost() + self.reader.missed
        was, self.lost_total = self.lost_total, lost
        return lost > was

    def take(self, pid: int) -> list[tracefs.Event]:
        events, self.inbox[pid] = self.inbox.get(pid, []), []
        return events


class Tracepoint(Backend):
    name = "tracepoint"

    def __init__(self, pid: int, selection: VmaSelection):
        super().__init__(pid, selection)
        self._hub: _Hub | None = None
        self._pidfd = -1
        self._pagemap = -1
        self._boundary = 0  # the highest re-arm number of the last round
        self._ahead: list[tracefs.Event] = []  # events read early: they belong to the next round
        self._again: list[tracefs.Event] = []  # counted last round, unsure: count them once more

    @classmethod
    def availability(cls) -> Availability:
        if not (tracefs.TRACEFS / "events" / tracefs.SYSTEM).is_dir():
            return Availability(False, "the kernel lacks memsnap's write-event patch "
                                       "(no memsnap trace events in tracefs)")
        return Availability(True, "memsnap's write-event kernel patch is present")

    def _arm(self) -> PageRanges:
        self._pagemap = self.open_pagemap()
        self._pidfd = os.pidfd_open(self.pid)
        self._hub = _Hub.get()
        self._hub.add(self.pid)
        self._claim.save(TargetState(self.pid, self.starttime, self.name, note=str(self._hub.instance.path)))
        now, _ = self.refresh_vmas()
        self.tracked = self._mark(now)
        self._boundary = self._close_round(self.tracked)[2]
        return self._present(self.tracked)

    def collect(self) -> ProcessSample:
        self.check_alive()
        if not self.mm_alive(self._pagemap):
            return self._rearm_after_exec()
        now, events = self.refresh_vmas()
        known = self.tracked_ranges()
        old = [m for m in now if known.covers(m.start, m.end)]
        fresh = [m for m in now if not known.covers(m.start, m.end)]
        armed = self._mark(old + fresh)
        written, removed, boundary, lost = self._close_round(armed)
        self._boundary = boundary or self._boundary
        # A VMA the kernel saw removed this round, with memory mapped there again (mmap
        # MAP_FIXED, mremap): what is there now was never marked, so all of it counts.
        replaced = [m for m in armed if m in old and removed.intersection(PageRanges([(m.start, m.end)]))]
        events += [VmaEvent("replaced", m.start, m.end, m.path) for m in replaced]
        self.tracked = armed
        dirty = written.union(self._present([m for m in armed if m in fresh] + replaced))
        if lost:
            dirty = dirty.union(self._present(armed))
        return ProcessSample(self.pid, dirty, self.tracked, events, lost=lost, skipped=dict(self.skipped))

    def close(self) -> None:
        try:
            if self._pidfd >= 0 and self.tracked:
                _advise_each(self._pidfd, self.tracked, write_events.MADV_NOMEMSNAP)
        finally:
            for fd in (self._pidfd, self._pagemap):
                if fd >= 0:
                    os.close(fd)
            self._pidfd = self._pagemap = -1
            if self._hub is not None:
                self._hub.remove(self.pid)
                self._hub = None
            self.release_claim()

    def _rearm_after_exec(self) -> ProcessSample:
        """A new image has a new address space, with its own sequence numbers from 1."""
        os.close(self._pagemap)
        self._pagemap = self.open_pagemap()
        self.tracked, self._boundary, self._ahead, self._again = [], 0, [], []
        now, _ = self.refresh_vmas()
        self.tracked = self._mark(now)
        self._boundary = self._close_round(self.tracked)[2]
        events = [VmaEvent("exec", 0, 0, "")] + [VmaEvent("added", m.start, m.end, m.path) for m in self.tracked]
        return ProcessSample(self.pid, self._present(self.tracked), self.tracked, events, skipped=dict(self.skipped))

    # Steps

    def _mark(self, maps: list[Mapping]) -> list[Mapping]:
        """Mark or re-arm each VMA; those the kernel refuses are skipped, with why."""
        failed = _advise_each(self._pidfd, maps, write_events.MADV_MEMSNAP)
        for m, why in failed.items():
            self.skipped[_key(m)] = f"{m.kind} mapping {m.path or '(anon)'}: {why}"
        for m in maps:
            if m not in failed:
                self.skipped.pop(_key(m), None)
        return [m for m in maps if m not in failed]

    def _close_round(self, rearmed: list[Mapping]) -> tuple[PageRanges, PageRanges, int, bool]:
        """The pages written before each VMA's re-arm, the ranges removed this round, the
        round's closing number, and whether anything was lost."""
        events, lost = self._read_through(rearmed)
        cuts = _Cuts(events, rearmed, self._boundary)
        closing = cuts.closing or self._boundary
        mine = [_page_range(e) for e in self._again]
        removed, self._ahead, self._again = [], [], []
        for e in events:
            limit = cuts.limit(e.start)
            if limit is not None and e.seq > limit:
                self._ahead.append(e)  # after its VMA was re-armed: next round
            elif e.name == "page_written":
                mine.append(_page_range(e))
                if limit is None:
                    # Not re-protected this round: the write itself may land after we read.
                    self._again.append(e)
            elif e.name == "vma_removed":
                removed.append((e.start, e.end))
        seen = {e.seq for e in events}
        gaps = any(s not in seen for s in range(self._boundary + 1, closing + 1))
        return PageRanges(mine), PageRanges(removed), closing, lost or gaps

    def _read_through(self, rearmed: list[Mapping]) -> tuple[list[tracefs.Event], bool]:
        """Events up to this round's last re-arm. A number below it can still be in flight on
        another CPU (taken, not yet recorded): read again briefly before calling it lost."""
        lost = False
        events = list(self._ahead)
        for attempt in range(3):
            lost |= self._hub.pump()
            events += self._hub.take(self.pid)
            closing = _Cuts(events, rearmed, self._boundary).closing
            seen = {e.seq for e in events}
            if closing and all(s in seen for s in range(self._boundary + 1, closing + 1)):
                break
            time.sleep(0.001 * (attempt + 1))
        return events, lost

    def _present(self, maps: list[Mapping]) -> PageRanges:
        return self.pages_with(pagemap.Scanner(self._pagemap), PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                               [(m.start, m.end) for m in maps])


class _Cuts:
    """This round's re-arms: the vma_marked events (numbered above `after`) inside each
    re-armed mapping. The kernel reports a re-arm per VMA it touched, so one mapping may
    have several (split meanwhile, or re-armed twice); a page's cut is the highest that
    covers it."""

    def __init__(self, events: list[tracefs.Event], rearmed: list[Mapping], after: int):
        self._maps = sorted((m.start, m.end) for m in rearmed)
        self._marks: dict[int, list[tuple[int, int, int]]] = {}
        for e in events:
            if e.name == "vma_marked" and e.seq > after:
                i = self._index(e.start)
                if i is not None and e.end <= self._maps[i][1]:
                    self._marks.setdefault(i, []).append((e.start, e.end, e.seq))
        self.closing = max((seq for marks in self._marks.values() for _, _, seq in marks), default=0)

    def _index(self, addr: int) -> int | None:
        i = bisect.bisect_right(self._maps, (addr, float("inf"))) - 1
        return i if i >= 0 and self._maps[i][0] <= addr < self._maps[i][1] else None

    def limit(self, addr: int) -> int | None:
        """The number of the last re-arm of addr this round; None if it was not re-armed."""
        marks = self._marks.get(self._index(addr), ())
        return max((seq for start, end, seq in marks if start <= addr < end), default=None)


def _page_range(e: tracefs.Event) -> tuple[int, int]:
    return (e.start & ~(pagemap.PAGE_SIZE - 1), e.end)


def _advise_each(pidfd: int, maps: list[Mapping], advice: int) -> dict[Mapping, str]:
    """Advise every VMA in one call; if the kernel stops early, go one by one to find which."""
    ranges = [(m.start, m.size) for m in maps]
    if not ranges:
        return {}
    try:
        if write_events.process_madvise(pidfd, ranges, advice) == sum(n for _, n in ranges):
            return {}
    except OSError:
        pass
    failed = {}
    for m in maps:
        try:
            write_events.process_madvise(pidfd, [(m.start, m.size)], advice)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise TargetGone("target exited") from None
            if exc.errno == errno.EPERM:
                raise TrackingError("not permitted to mark the target's memory: process_madvise "
                                    "needs CAP_SYS_NICE and ptrace read access") from None
            failed[m] = exc.strerror or str(exc)
    return failed


def release_stale(state: TargetState) -> None:
    """Unmark a target a killed tracker left marked, and drop that tracker's instance."""
    from ..procfs import read_maps
    try:
        pidfd = os.pidfd_open(state.pid)
    except OSError:
        return
    try:
        _advise_each(pidfd, [m for m in read_maps(state.pid) if m.writable], write_events.MADV_NOMEMSNAP)
    except TrackingError:
        pass
    finally:
        os.close(pidfd)
    instance = state.note.rsplit("/", 1)[-1]
    owner = instance.rsplit("-", 1)[-1]
    if instance.startswith("memsnap-tracker-") and owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
        tracefs.remove_instance(instance)


def _key(m: Mapping) -> str:
    return f"{m.start:x}-{m.end:x}"
