"""One cgroup per node, in every hierarchy that can freeze or account it.

Hosts differ: Debian 12 here is hybrid (v1 freezer/memory/pids + an empty cgroup2 at
/sys/fs/cgroup/unified), a Debian 13 host is usually cgroup2 only. We use whichever of v1
freezer, v1 memory, v1 pids and cgroup2 are mounted; the node's directory is ``memsnap/<name>``
in each.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

V1_CONTROLLERS = ("freezer", "memory", "pids")


def hierarchies() -> dict[str, Path]:
    """Mount points keyed by 'cgroup2' or the v1 controller name (first mount of each wins)."""
    found: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, options = right.split()[:3]
            mountpoint = Path(left.split()[4].replace("\\040", " "))
            if fstype == "cgroup2":
                found.setdefault("cgroup2", mountpoint)
            elif fstype == "cgroup":
                for opt in options.split(","):
                    if opt in V1_CONTROLLERS:
                        found.setdefault(opt, mountpoint)
    return found


def paths(name: str) -> dict[str, Path]:
    return {kind: mount / "memsnap" / name for kind, mount in hierarchies().items()}


def create(name: str) -> dict[str, Path]:
    made = paths(name)
    for path in made.values():
        path.mkdir(parents=True, exist_ok=True)
    return made


def join(name: str, pid: int = 0) -> None:
    """Move ``pid`` (0 = the caller) into the node's cgroups."""
    for path in paths(name).values():
        if path.is_dir():
            (path / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")


def pids(name: str) -> set[int]:
    found: set[int] = set()
    for path in paths(name).values():
        try:
            found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        except FileNotFoundError:
            pass
    return found


def thaw(name: str) -> None:
    """Frozen tasks cannot die: thaw before killing."""
    for kind, path in paths(name).items():
        try:
            if kind == "freezer":
                (path / "freezer.state").write_text("THAWED\n")
            elif kind == "cgroup2":
                (path / "cgroup.freeze").write_text("0\n")
        except FileNotFoundError:
            pass


def kill_all(name: str, timeout: float = 10.0) -> None:
    """SIGKILL every task in the node's cgroups and wait until they are gone."""
    thaw(name)
    deadline = time.monotonic() + timeout
    while True:
        left = pids(name)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"cgroup of {name} still has tasks {sorted(left)} after SIGKILL")
        time.sleep(0.05)


def remove(name: str) -> None:
    for path in paths(name).values():
        _rmdir(path)
        parent = path.parent
        if parent.is_dir() and not any(p.is_dir() for p in parent.iterdir()):
            _rmdir(parent)  # the shared memsnap/ directory goes with the last node


def _rmdir(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # dying tasks still charged: retry briefly
                time.sleep(0.05)
                continue
            raise
