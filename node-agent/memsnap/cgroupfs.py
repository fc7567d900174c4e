"""Where the cgroup hierarchies are mounted, and a process's cgroup in each."""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

V1_CONTROLLERS = ("freezer", "memory", "pids", "cpu", "cpuacct")


def hierarchies(controllers: tuple[str, ...] = V1_CONTROLLERS,
                mountinfo: str = "/proc/self/mountinfo") -> dict[str, Path]:
    """Mount points keyed by 'cgroup2' or a v1 controller name (the first mount of each wins)."""
    found: dict[str, Path] = {}
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, options = right.split()[:3]
            mountpoint = Path(left.split()[4].replace("\\040", " "))
            if fstype == "cgroup2":
                found.setdefault("cgroup2", mountpoint)
            elif fstype == "cgroup":
                for opt in options.split(","):
                    if opt in controllers:
                        found.setdefault(opt, mountpoint)
    return found


def membership(pid: int) -> dict[str, str]:
    """pid's cgroup path per hierarchy ('cgroup2' or the v1 controller), from /proc/PID/cgroup."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if not controllers:
                out["cgroup2"] = path
            for c in controllers.split(","):
                out[c] = path
    return out


class FreezeError(Exception):
    pass


@dataclass
class Freezer:
    """One cgroup's freezer: cgroup2's cgroup.freeze, or the v1 freezer's freezer.state."""

    path: Path
    v2: bool

    def freeze(self, timeout: float = 10.0) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1")
        else:
            (self.path / "freezer.state").write_text("FROZEN")
        deadline = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() > deadline:
                self.thaw()
                raise FreezeError(f"{self.path} did not freeze within {timeout} s")
            time.sleep(0.0005)

    def thaw(self) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("0")
        else:
            (self.path / "freezer.state").write_text("THAWED")

    def frozen(self) -> bool:
        if self.v2:
            return "frozen 1" in (self.path / "cgroup.events").read_text()
        return (self.path / "freezer.state").read_text().strip() == "FROZEN"

    def remove(self) -> None:
        """Drop the cgroup once nothing is left in it."""
        try:
            self.path.rmdir()
        except OSError:
            pass


def leave(path: Path) -> None:
    """Move every task of cgroup path to its parent and remove it (undoing a private cgroup)."""
    procs = path / "cgroup.procs"
    for _ in range(3):  # tasks forked meanwhile show up on the next read
        try:
            pids = procs.read_text().split()
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                (path.parent / "cgroup.procs").write_text(pid)
            except ProcessLookupError:
                pass
    try:
        path.rmdir()
    except OSError:
        pass


# ---- whole cgroup trees (a node's, a container's), given their path in each hierarchy ----

_THAW = {"freezer.state": "THAWED", "cgroup.freeze": "0"}


def subtree(path: Path) -> list[Path]:
    """path and every cgroup below it (tools inside may make their own), deepest first."""
    if not path.is_dir():
        return []
    return [Path(d) for d, _, _ in os.walk(path, topdown=False)]


def tasks(paths) -> set[int]:
    """Every task in these cgroups, sub-cgroups included."""
    found: set[int] = set()
    for path in paths:
        for cg in subtree(path):
            try:
                found.update(int(p) for p in (cg / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                pass
    return found


def thaw_all(paths) -> None:
    """Thaw these cgroups and every one below, top-down (a frozen task cannot even die)."""
    for path in paths:
        for cg in reversed(subtree(path)):
            for control, value in _THAW.items():
                try:
                    (cg / control).write_text(value + "\n")
                except (FileNotFoundError, PermissionError):
                    pass


def kill_tasks(paths, what: str, timeout: float = 10.0) -> bool:
    """SIGKILL every task in these cgroups and wait until none is left; whether any was.
    Frozen tasks are killed before they are thawed (a frozen task cannot even die): with the
    signal pending they never run their own code again, so a frozen copy that was checkpointed
    or moved away does nothing after its dump."""
    paths = list(paths)
    _kill(tasks(paths))
    thaw_all(paths)
    deadline = time.monotonic() + timeout
    found = False
    while left := tasks(paths):
        found = True
        _kill(left)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} still has tasks {sorted(left)} after SIGKILL")
        time.sleep(0.02)
    return found


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rmdir(path: Path) -> None:
    """Remove an empty cgroup, waiting briefly while dying tasks are still charged to it."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                time.sleep(0.05)
                continue
            raise


def join_fn(paths):
    """A preexec_fn (or post-fork call) moving the caller into these cgroups: only os calls,
    safe between fork and exec."""
    targets = [str(p / "cgroup.procs") for p in paths]

    def join() -> None:
        me = str(os.getpid()).encode()
        for t in targets:
            fd = os.open(t, os.O_WRONLY)
            try:
                os.write(fd, me)
            finally:
                os.close(fd)

    return join
