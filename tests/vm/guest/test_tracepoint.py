"""The memsnap tracepoint mechanism against real workloads, inside the guest."""

from __future__ import annotations

import ctypes
import mmap
import os
import time

import pytest

from memsnap.kernel import tracefs, write_events
from conftest import PAGE, Workload

HUGE = 2 << 20


def of(events: list[tracefs.Event], pid: int, name: str) -> list[tracefs.Event]:
    return [e for e in events if e.pid == pid and e.name == name]


def written(events: list[tracefs.Event], pid: int) -> set[int]:
    """Every page address covered by the page_written events of pid."""
    pages: set[int] = set()
    for e in of(events, pid, "page_written"):
        pages.update(range(e.start, e.end, PAGE))
    return pages


def test_marked_written_removed_exact(trace, workload: Workload) -> None:
    workload.mark()
    pages = [0, 1, 5, 7, 40, 63]
    workload.write(*pages)
    workload.write(*pages)  # second writes to a page do not fire again
    workload.do("munmap")
    events = trace.read_events()
    w = workload
    assert [(e.start, e.end) for e in of(events, w.pid, "vma_marked")] == \
        [(w.addr, w.addr + w.pages * PAGE)]
    writes = of(events, w.pid, "page_written")
    assert sorted(e.start for e in writes) == [w.page(p) for p in pages]
    assert all(e.end - e.start == PAGE for e in writes)
    assert [(e.start, e.end) for e in of(events, w.pid, "vma_removed")] == \
        [(w.addr, w.addr + w.pages * PAGE)]
    seqs = sorted(e.seq for e in events if e.pid == w.pid)
    assert seqs == list(range(1, len(seqs) + 1)), "sequence numbers are dense"
    assert trace.lost() == 0


def test_rearm_fires_again(trace, workload: Workload) -> None:
    workload.mark()
    workload.write(3, 4)
    workload.mark()  # re-arm
    workload.write(3)
    events = trace.read_events()
    marks = of(events, workload.pid, "vma_marked")
    writes = of(events, workload.pid, "page_written")
    assert len(marks) == 2
    assert [e.start for e in writes] == [workload.page(3), workload.page(4), workload.page(3)]
    # The re-arm's number splits the rounds.
    assert [e.seq < marks[1].seq for e in writes] == [True, True, False]


def test_rearm_races_with_a_writer(trace, workload: Workload) -> None:
    """Re-arm while another CPU keeps writing every page: each round, split by
    the re-arms' sequence numbers, must report every page, and nothing is lost."""
    workload.mark()
    workload.do("spin", 0, workload.pages)
    events = []
    for _ in range(15):
        start = int(workload.do("cycles"))
        while int(workload.do("cycles")) < start + 2:  # a full pass after the re-arm
            time.sleep(0.005)
        workload.mark()
        events += trace.read_events()
    workload.do("stop")
    events += trace.read_events()
    seq = tracefs.SeqCheck()
    seq.add(events)
    assert trace.lost() == 0 and seq.missing(workload.pid) == []
    marks = sorted(e.seq for e in of(events, workload.pid, "vma_marked"))
    writes = of(events, workload.pid, "page_written")
    every_page = {workload.page(p) for p in range(workload.pages)}
    for lo, hi in zip(marks, marks[1:]):
        assert {e.start for e in writes if lo < e.seq < hi} == every_page


def test_self_mark_with_madvise(trace) -> None:
    region = mmap.mmap(-1, 8 * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    try:
        write_events.mark_self(addr, 8 * PAGE)
        region[2 * PAGE] = 1
        region[6 * PAGE] = 1
        write_events.unmark_self(addr, 8 * PAGE)
        region[7 * PAGE] = 1  # unmarked: silent
        events = trace.read_events()
        assert written(events, os.getpid()) == {addr + 2 * PAGE, addr + 6 * PAGE}
        assert len(of(events, os.getpid(), "vma_unmarked")) == 1
    finally:
        region.close()


def test_fork_does_not_inherit(trace, workload: Workload) -> None:
    workload.mark()
    child = int(workload.do("fork-write", 10, 11))
    workload.write(12)
    events = trace.read_events()
    assert not [e for e in events if e.pid == child]
    # The child's writes are in its own, unmarked copy.
    assert written(events, workload.pid) == {workload.page(12)}


def test_exit_fires_removal(trace, workload: Workload) -> None:
    workload.mark()
    workload.do("exit")
    workload.proc.wait()
    removed = of(trace.read_events(), workload.pid, "vma_removed")
    assert [(e.start, e.end) for e in removed] == [(workload.addr, workload.addr + 64 * PAGE)]


def test_exec_fires_removal(trace, workload: Workload) -> None:
    workload.mark()
    workload.do("exec")
    removed: list[tracefs.Event] = []
    deadline = time.monotonic() + 20
    while not removed and time.monotonic() < deadline:
        removed = of(trace.read_events(), workload.pid, "vma_removed")
        time.sleep(0.05)
    assert [(e.start, e.end) for e in removed] == [(workload.addr, workload.addr + 64 * PAGE)]


def test_mprotect_split_and_partial_unmark(trace, workload: Workload) -> None:
    workload.mark()
    workload.do("mprotect", 8, 4, "r")   # splits the vma in three
    workload.do("mprotect", 8, 4, "rw")  # merges back; must not make pages writable
    workload.write(9)
    write_events.unmark(workload.pidfd, [(workload.page(0), 4 * PAGE)])
    workload.write(1, 20)
    events = trace.read_events()
    assert written(events, workload.pid) == {workload.page(9), workload.page(20)}
    assert [(e.start, e.end) for e in of(events, workload.pid, "vma_unmarked")] == \
        [(workload.page(0), workload.page(4))]


def test_mremap_moves_the_mark(trace, workload: Workload) -> None:
    workload.mark()
    workload.write(1)
    old = workload.addr
    new = int(workload.do("mremap", 80), 16)
    workload.addr, workload.pages = new, 80
    workload.write(1, 70)  # page 1 was writable before the move: re-armed now
    events = trace.read_events()
    assert [(e.start, e.end) for e in of(events, workload.pid, "vma_removed")] == \
        [(old, old + 64 * PAGE)]
    assert [(e.start, e.end) for e in of(events, workload.pid, "vma_marked")][-1] == \
        (new, new + 80 * PAGE)
    assert written(events, workload.pid) == {old + PAGE, new + PAGE, new + 70 * PAGE}


def test_dontneed_reports_the_range(trace, workload: Workload) -> None:
    workload.mark()
    workload.do("dontneed", 4, 3)
    events = of(trace.read_events(), workload.pid, "page_written")
    assert [(e.start, e.end) for e in events] == [(workload.page(4), workload.page(7))]


def test_huge_page_write(trace, workload_factory) -> None:
    w = workload_factory(1024, HUGE)  # 4 MiB, 2 MiB aligned, MADV_HUGEPAGE
    w.mark()
    w.write(0)
    w.write(5)  # same huge page: already writable
    writes = of(trace.read_events(), w.pid, "page_written")
    if writes and writes[0].end - writes[0].start == PAGE:
        pytest.skip("no THP for this fault (memory fragmentation?)")
    assert [(e.start, e.end) for e in writes] == [(w.addr, w.addr + HUGE)]


def test_provoked_loss_is_detected_and_over_reports(workload_factory) -> None:
    """A tiny buffer and many writes: the counters and the sequence numbers
    both show the loss, and counting the whole range covers every write."""
    trace = tracefs.Instance.create("memsnap-loss", buffer_kb=4)
    try:
        w = workload_factory(4096)
        w.mark()
        pages = list(range(0, 4096, 2))
        w.write(*pages)
        events = trace.read_events()
        seq = tracefs.SeqCheck()
        seq.add(events)
        assert trace.lost() > 0, "the ring buffer must have overrun"
        assert seq.missing(w.pid), "the sequence numbers must show gaps"
        # What an agent reports for the round: everything, since it lost events.
        reported = set(range(w.addr, w.addr + w.pages * PAGE, PAGE))
        assert {w.page(p) for p in pages} <= reported
        assert len(written(events, w.pid)) < len(pages), "some events were really lost"
    finally:
        trace.remove()


def test_raw_reader_exact_and_loss() -> None:
    """The binary trace_pipe_raw reader sees the same events, and the pages'
    missed-events counts match the overrun counter and the sequence gaps."""
    trace = tracefs.Instance.create("memsnap-raw", buffer_kb=4)
    raw = tracefs.RawReader(trace)
    w = Workload(4096)
    try:
        w.mark()
        w.write(0, 3, 63)
        events = raw.read_events()
        assert [(e.name, e.start) for e in events] == \
            [("vma_marked", w.addr)] + [("page_written", w.page(p)) for p in (0, 3, 63)]
        w.write(*range(64, 4096, 2))
        events += raw.read_events()
        seq = tracefs.SeqCheck()
        seq.add(events)
        assert raw.missed == trace.lost() == len(seq.missing(w.pid)) > 0
    finally:
        w.stop()
        raw.close()
        trace.remove()


def test_loss_with_recording_off_shows_in_sequence_numbers(trace, workload: Workload) -> None:
    """Losses no ring-buffer counter sees (tracing_on=0) still leave gaps."""
    workload.mark()
    (trace.path / "tracing_on").write_text("0")
    workload.write(1, 2, 3)
    (trace.path / "tracing_on").write_text("1")
    workload.write(4)
    events = trace.read_events()
    assert trace.lost() == 0
    seq = tracefs.SeqCheck()
    seq.add(events)
    assert len(seq.missing(workload.pid)) == 3


def test_hugetlb_and_special_mappings_are_refused() -> None:
    vdso = next(line for line in open("/proc/self/maps") if "[vdso]" in line)
    start, end = (int(x, 16) for x in vdso.split()[0].split("-"))
    with pytest.raises(OSError) as err:
        write_events.mark_self(start, end - start)
    assert err.value.errno == 22
