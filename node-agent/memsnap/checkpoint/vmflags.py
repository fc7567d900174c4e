"""VMA flags read before the freeze, and the guard that tells whether they still hold.

CRIU takes each VMA's flags (VmFlags: MADV_DONTFORK, mlock, THP advice, ...) from
/proc/PID/smaps, and smaps walks every page table entry to print counters CRIU does not use
(~20 ns a page: 80 ms at 4 GiB, all of it while the tasks are frozen). memsnap's CRIU (patch
0009, --vmflags-dir) takes them from a file per task instead, and its VMAs from
/proc/PID/maps, which walks no page table. memsnap writes those files while the tasks still
run, after starting a guard: perf counters (kernel/perf.py) on every syscall that can change
a VMA's flags without changing its range. Once the tasks are frozen, a task the guard saw make
such a call loses its file and CRIU reads its smaps as before; so does a task whose VMAs no
longer match the file (CRIU checks every range against maps).

Guarded: madvise with an advice that sets a flag, mlock and friends, prctl
PR_SET_MEMORY_MERGE, mmap with MAP_FIXED, and the calls after which a new VMA may take an old
VMA's exact range (munmap, mremap, brk, shmat/shmdt, remap_file_pages, exec). A guarded call
already under way when the guard started shows as one more exit than entries.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from .. import procfs
from ..kernel.arch import ARCH
from ..kernel.perf import TracepointCounter
from . import criu

log = logging.getLogger(__name__)

# Calls that may change flags whatever their arguments; and those that may only with some.
_ALWAYS = ("munmap", "mremap", "brk", "shmat", "shmdt", "remap_file_pages", "execve", "execveat",
           "mlock", "munlock", "mlockall", "munlockall", "mlock2")
_SOMETIMES = ("madvise", "prctl", "mmap")
# MADV_NORMAL/RANDOM/SEQUENTIAL (0-2) and DONTFORK..KEEPONFORK (10-19) set or clear a VmFlag.
_FLAG_ADVICE = "behavior <= 2 || (behavior >= 10 && behavior <= 19)"
PR_SET_MEMORY_MERGE = 67
MAP_FIXED = 0x10
MAX_THREADS = 256  # per task: beyond that the counters cost more than smaps saves


def _ids(names: tuple[str, ...]) -> str:
    return " || ".join(f"id == {ARCH.nr[n]}" for n in names)


# (role, system, event, filter): any "changed" hit, or more "left" than "entered", voids the file.
_GUARDS = (
    ("changed", "raw_syscalls", "sys_enter", _ids(_ALWAYS)),
    ("changed", "syscalls", "sys_enter_madvise", _FLAG_ADVICE),
    ("changed", "syscalls", "sys_enter_prctl", f"option == {PR_SET_MEMORY_MERGE}"),
    ("changed", "syscalls", "sys_enter_mmap", f"flags & {MAP_FIXED}"),
    ("entered", "raw_syscalls", "sys_enter", _ids(_ALWAYS + _SOMETIMES)),
    ("left", "raw_syscalls", "sys_exit", _ids(_ALWAYS + _SOMETIMES)),
)


class _Guard:
    """The guard counters of one task, on each of its threads (and what they create)."""

    def __init__(self, pid: int):
        self.counters: list[tuple[str, TracepointCounter]] = []
        try:
            seen: set[int] = set()
            while True:  # a thread started meanwhile by one not yet counted: count it too
                new = [t for t in procfs.threads(pid) if t not in seen]
                if not new:
                    break
                if len(seen) + len(new) > MAX_THREADS:
                    raise OSError(f"more than {MAX_THREADS} threads")
                for tid in new:
                    self.counters += [(role, TracepointCounter(system, event, tid, flt))
                                      for role, system, event, flt in _GUARDS]
                seen.update(new)
        except BaseException:
            self.close()
            raise

    def held(self) -> bool:
        """Whether no guarded call ran since the guard started (call it with the task frozen)."""
        hits = {"changed": 0, "entered": 0, "left": 0}
        for role, counter in self.counters:
            hits[role] += counter.read()
        return hits["changed"] == 0 and hits["left"] <= hits["entered"]

    def close(self) -> None:
        for _, counter in self.counters:
            counter.close()


class EarlyVmFlags:
    """VMA flags read before the freeze into a private directory for CRIU's --vmflags-dir;
    settle() with the tasks frozen keeps only the files that still hold. read() may come
    early (a migration reads them when the pause draws near, out of its last round's way) and
    again: it reads only what is not read yet or changed since."""

    def __init__(self, pids: list[int], under: Path | None = None, wanted: bool | None = None):
        """under: where CRIU will see the files (the images directory, for a CRIU that runc
        starts in the node's mount namespace); a private temporary directory by default.
        wanted: whether to read them at all; by default, whether this node's CRIU takes them
        (patch 0009): otherwise read() does nothing and CRIU reads smaps."""
        self.wanted = criu.has_vmflags_dir() if wanted is None else wanted
        if under is not None:
            under.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="memsnap-vmflags-", dir=under))  # 0700
        self.guards: dict[int, _Guard] = {}
        self.pids = list(pids)

    def read(self, pids: list[int] | None = None) -> None:
        """Start each task's guard, then write its flags; a task already read whose guard saw
        nothing is left as it is, pids adds tasks. A task that cannot be guarded (no perf, no
        such trace events, too many threads) gets no file: CRIU reads smaps."""
        if not self.wanted:
            return
        self.pids += [p for p in pids or [] if p not in self.pids]
        for pid in self.pids:
            old = self.guards.get(pid)
            if old is not None and old.held():
                continue
            if old is not None:
                _close_aside([self.guards.pop(pid)])
            try:
                self.guards[pid] = _Guard(pid)
                lines = [f"{m.start:x}-{m.end:x} {' '.join(sorted(flags))}\n"
                         for m, flags in procfs.read_vmflags(pid)]
            except OSError as exc:
                log.info("VMA flags of pid %d are left to CRIU (smaps): %s", pid, exc)
                (self.dir / str(pid)).unlink(missing_ok=True)
                continue
            (self.dir / str(pid)).write_text("".join(lines))

    def settle(self) -> list[int]:
        """With the tasks frozen: drop the file of every task whose guard saw a change.
        Returns the pids whose flags were read before the freeze."""
        kept = []
        for pid, guard in self.guards.items():
            path = self.dir / str(pid)
            if path.exists() and guard.held():
                kept.append(pid)
            else:
                path.unlink(missing_ok=True)
        return kept

    def criu_options(self) -> list[str]:
        """For runc's CRIU configuration file; none if this CRIU lacks patch 0009."""
        return [f"vmflags-dir {self.dir}"] if self.wanted else []

    def describe(self, pids: list[int], kept: list[int]) -> str:
        """Where CRIU took the VMA flags of pids from, given settle()'s answer."""
        early = sorted(set(pids) & set(kept))
        if early == sorted(set(pids)):
            return "read before the freeze"
        if early:
            return f"read before the freeze for pids {early}, from smaps while frozen for the rest"
        return "from smaps while frozen"

    def close(self) -> None:
        """Remove the files; close the counters aside: each close waits for an RCU grace
        period (~35 ms here), which is no business of the pause."""
        shutil.rmtree(self.dir, ignore_errors=True)
        guards, self.guards = list(self.guards.values()), {}
        _close_aside(guards)

    def __enter__(self) -> EarlyVmFlags:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_aside(guards: list[_Guard]) -> None:
    if guards:
        threading.Thread(target=lambda: [g.close() for g in guards], daemon=True,
                         name="vmflags-guard-close").start()
