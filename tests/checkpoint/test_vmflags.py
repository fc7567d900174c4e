"""The guard over VMA flags read before a freeze (checkpoint/vmflags.py), on real processes
of this machine: a call that may change a VMA's flags voids the task's file, calls that
cannot leave it alone, and a thread started after the guard is watched too."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from memsnap.checkpoint.vmflags import EarlyVmFlags  # wanted=True: this host has no CRIU to ask

# A process that runs one call on request, in its main thread or in a new one.
TARGET = r"""
import mmap, sys, threading
m = mmap.mmap(-1, 1 << 20)
kept = []
calls = {
    "nothing": lambda: None,
    "dontneed": lambda: m.madvise(mmap.MADV_DONTNEED),
    "mmap": lambda: kept.append(mmap.mmap(-1, 1 << 16)),
    "dontfork": lambda: m.madvise(mmap.MADV_DONTFORK),
    "munmap": lambda: mmap.mmap(-1, 1 << 16).close(),
}
print("ready", flush=True)
for line in sys.stdin:
    call, where = line.split()
    if where == "thread":
        t = threading.Thread(target=calls[call]); t.start(); t.join()
    else:
        calls[call]()
    print("done", flush=True)
"""


@pytest.fixture
def target():
    procs = []

    def start():
        p = subprocess.Popen([sys.executable, "-c", TARGET], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "ready\n"
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.kill()
        p.wait()


def flags_after(p, call: str, where: str = "main") -> tuple[list[int], str]:
    with EarlyVmFlags([p.pid], wanted=True) as flags:
        flags.read()
        written = (flags.dir / str(p.pid)).read_text()
        p.stdin.write(f"{call} {where}\n")
        p.stdin.flush()
        assert p.stdout.readline() == "done\n"
        p.send_signal(signal.SIGSTOP)  # frozen, as the dump would have it
        try:
            return flags.settle(), written
        finally:
            p.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("call", ["nothing", "dontneed", "mmap"])
def test_calls_that_change_no_vma_flag_keep_the_file(target, call):
    p = target()
    kept, written = flags_after(p, call)
    assert kept == [p.pid]
    first = open(f"/proc/{p.pid}/maps").readline().split()[0]
    assert written.startswith(f"{first} ")  # maps' first range, with its VmFlags
    assert " rd " in written.splitlines()[0] + " "


@pytest.mark.parametrize("call", ["dontfork", "munmap"])
@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_call_that_may_change_vma_flags_voids_the_file(target, call, where):
    p = target()
    kept, _ = flags_after(p, call, where)
    assert kept == []


def test_reading_again_renews_a_file_the_guard_voided(target):
    """A migration reads the flags when its pause draws near and again at the freeze: the
    second read takes anew what changed in between, and nothing else."""
    p = target()
    with EarlyVmFlags([p.pid], wanted=True) as flags:
        flags.read()
        first = (flags.dir / str(p.pid)).read_text()
        p.stdin.write("dontfork main\n")
        p.stdin.flush()
        assert p.stdout.readline() == "done\n"
        flags.read()
        again = (flags.dir / str(p.pid)).read_text()
        flags.read()  # nothing changed since: left as it is
        p.send_signal(signal.SIGSTOP)
        try:
            assert flags.settle() == [p.pid]
        finally:
            p.send_signal(signal.SIGCONT)
    assert " dc" not in first and " dc" in again  # MADV_DONTFORK's flag, read the second time
