"""Plain /proc parsing: memory maps, process identity and state, threads, children, fds."""
from __future__ import annotations

import os
from dataclasses import dataclass

PSEUDO_MAPPINGS = frozenset({"[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]"})


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    inode: int
    path: str  # "" for anonymous memory, "[heap]", "[stack]", a file path, ...

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def kind(self) -> str:
        """anon, heap, stack, file or special (vdso and friends), plus a shared- prefix."""
        if self.path in PSEUDO_MAPPINGS:
            return "special"
        if self.path == "[heap]":
            kind = "heap"
        elif self.path.startswith("[stack"):
            kind = "stack"
        elif self.inode == 0:
            kind = "anon"
        else:
            kind = "file"
        return kind if self.private else f"shared-{kind}"


def parse_maps_line(line: str) -> Mapping:
    fields = line.split(maxsplit=5)
    start, end = fields[0].split("-")
    return Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16), int(fields[4]),
                   fields[5].rstrip("\n") if len(fields) > 5 else "")


def read_maps(pid: int) -> list[Mapping]:
    with open(f"/proc/{pid}/maps") as f:
        return [parse_maps_line(line) for line in f]


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat that memsnap uses."""

    pid: int
    comm: str
    state: str
    ppid: int
    starttime: int  # clock ticks after boot: with pid, identifies a process across pid reuse


def read_stat(pid: int) -> Stat:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm may contain spaces and parentheses: it ends at the last ')'
    left, right = data.index("("), data.rindex(")")
    rest = data[right + 2:].split()
    return Stat(int(data[:left]), data[left + 1:right], rest[0], int(rest[1]), int(rest[19]))


def read_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def has_capability(status: dict[str, str], cap: int) -> bool:
    return bool(int(status.get("CapEff", "0"), 16) >> cap & 1)


CAP_SYS_PTRACE = 19


def threads(pid: int) -> list[int]:
    return sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))


def children(pid: int) -> set[int]:
    """Direct children of every thread of pid."""
    found: set[int] = set()
    for tid in threads_or_empty(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.update(int(c) for c in f.read().split())
        except FileNotFoundError:
            continue
    return found


def threads_or_empty(pid: int) -> list[int]:
    try:
        return threads(pid)
    except FileNotFoundError:
        return []


def descendants(pid: int) -> list[int]:
    """pid's descendants, parents before children."""
    found, queue = [], [pid]
    while queue:
        for child in sorted(children(queue.pop(0))):
            found.append(child)
            queue.append(child)
    return found


def fd_target(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except (FileNotFoundError, ProcessLookupError):
        return None


def fds_pointing_to(pid: int, target: str) -> list[int]:
    """The fds of pid whose /proc link reads `target` (e.g. 'anon_inode:[userfaultfd]')."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if fd_target(pid, int(n)) == target)


def ns_pids(pid: int) -> list[int]:
    """pid in each PID namespace it belongs to, outermost (ours) first (the NSpid line)."""
    return [int(x) for x in read_status(pid).get("NSpid", str(pid)).split()]


def image_ids(root: int, pids: list[int]) -> dict[int, int]:
    """The ids CRIU gives the tasks of root's tree in its images: their pids in the PID
    namespace of root (1 for root itself when it is that namespace's init). A task that
    exited meanwhile is left out (a shell's short-lived children come and go)."""
    level = len(ns_pids(root)) - 1
    ids = {}
    for pid in pids:
        try:
            ids[pid] = ns_pids(pid)[level]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return ids


def starttime_or_none(pid: int) -> int | None:
    """pid's start time, or None if it exited (between being listed and being read)."""
    try:
        return read_stat(pid).starttime
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int, starttime: int | None = None) -> bool:
    """Whether pid runs (and is still the same process, when starttime is given)."""
    try:
        stat = read_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.state not in ("Z", "X") and (starttime is None or stat.starttime == starttime)


def read_vmflags(pid: int) -> list[tuple[Mapping, set[str]]]:
    """Every mapping of pid with its VmFlags from /proc/PID/smaps (e.g. 'uw' = uffd-wp armed)."""
    out: list[tuple[Mapping, set[str]]] = []
    current: Mapping | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("VmFlags:") and current is not None:
                out.append((current, set(line.split()[1:])))
            elif "-" in line.split(" ", 1)[0] and not line.split(" ", 1)[0].endswith(":"):
                current = parse_maps_line(line)
    return out
