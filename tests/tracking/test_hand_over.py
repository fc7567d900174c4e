"""UffdWp.hand_over: what CRIU --track-mem-uffd will see once the tracker hands over, on the real
kernel. A write-protected page must mean "unchanged and held by the parent"; everything else
must read as written or be gone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from memsnap.kernel import pagemap
from memsnap.kernel.pagemap import PAGE_SIZE
from memsnap.tracking import VmaSelection
from memsnap.tracking.pages import PageRanges
from memsnap.tracking.registry import availability
from memsnap.tracking.uffd_wp import UffdWp

pytestmark = pytest.mark.skipif(not availability("uffd-wp").ok, reason="uffd-wp unavailable")

PAGES = 64
# Maps a file privately, copies every page on write (its own data now), prints the address,
# then on each line of stdin runs it: "discard FIRST COUNT" (MADV_DONTNEED, which for a file
# mapping brings back the file's bytes) or "write FIRST COUNT".
CHILD = f"""
import ctypes, mmap, sys
P = mmap.PAGESIZE
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), {PAGES} * P, flags=mmap.MAP_PRIVATE)
for i in range({PAGES}):
    m[i * P] = 0x55
view = ctypes.c_char.from_buffer(m)
addr = ctypes.addressof(view)
libc = ctypes.CDLL(None, use_errno=True)
print(addr, flush=True)
for line in sys.stdin:
    cmd, first, count = line.split()
    first, count = int(first), int(count)
    if cmd == "discard":
        assert libc.madvise(ctypes.c_void_p(addr + first * P), ctypes.c_size_t(count * P), 4) == 0
    else:
        for i in range(first, first + count):
            m[i * P] = 0x77
    print("ok", flush=True)
"""


@pytest.fixture
def child(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"\x11" * PAGES * PAGE_SIZE)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    yield proc, int(proc.stdout.readline())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tell(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ok"


def page_range(addr: int, first: int, count: int) -> PageRanges:
    return PageRanges([(addr + first * PAGE_SIZE, addr + (first + count) * PAGE_SIZE)])


def test_hand_over_leaves_protected_only_what_the_parent_holds(child):
    proc, addr = child
    mapping = page_range(addr, 0, PAGES)
    tracker = UffdWp(proc.pid, VmaSelection(("file",)))
    try:
        assert tracker.arm().intersection(mapping) == mapping  # the chain's first layer: all 64
        tell(proc, "write 0 4")  # written since that layer
        tell(proc, "discard 8 4")  # given up: the file's bytes again
        holds = page_range(addr, 0, 56)  # the parent lacks the last 8 pages
        written, entries = _frozen_hand_over(proc, tracker, addr, holds)
    finally:
        tracker.close()
    assert written == page_range(addr, 0, 4).union(page_range(addr, 56, 8))
    assert not any(pagemap.is_marker(e) for e in entries[8:12])  # no clean "swapped" page left there
    protected = {i for i, e in enumerate(entries) if e & pagemap.PM_UFFD_WP}
    assert protected == set(range(4, 8)) | set(range(12, 56))  # exactly: unchanged and in the parent


def test_a_hand_over_prepared_while_running_sees_what_the_target_did_after(child):
    """prepare_hand_over() runs before the freeze: writes and discards made after it must
    still come out right once hand_over() has run on the frozen target."""
    proc, addr = child
    tracker = UffdWp(proc.pid, VmaSelection(("file",)))
    try:
        tracker.arm()
        tell(proc, "write 0 4")
        holds = page_range(addr, 0, 56)
        tracker.prepare_hand_over(holds)  # the target still runs
        tell(proc, "write 20 2")
        tell(proc, "discard 8 4")  # leaves markers in this file mapping
        written, entries = _frozen_hand_over(proc, tracker, addr, holds)
    finally:
        tracker.close()
    assert written == page_range(addr, 0, 4).union(page_range(addr, 20, 2), page_range(addr, 56, 8))
    assert not any(pagemap.is_marker(e) for e in entries[8:12])
    protected = {i for i, e in enumerate(entries) if e & pagemap.PM_UFFD_WP}
    assert protected == set(range(4, 8)) | set(range(12, 20)) | set(range(22, 56))


def _frozen_hand_over(proc, tracker: UffdWp, addr: int, holds: PageRanges):
    """Stop the target (frozen, as for the final dump), hand over, and read what a dump would
    see: the written pages in the mapping and its pagemap entries; the target runs on after."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        tracker.hand_over(holds)
        written = tracker.written().intersection(page_range(addr, 0, PAGES))
        return written, pagemap.read_entries(tracker._pagemap, addr, addr + PAGES * PAGE_SIZE)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
