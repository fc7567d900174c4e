"""Where the cgroup hierarchies are mounted, and a process's cgroup in each."""
from __future__ import annotations

from pathlib import Path

V1_CONTROLLERS = ("freezer", "memory", "pids", "cpu", "cpuacct")


def hierarchies(mountinfo: str = "/proc/self/mountinfo") -> dict[str, Path]:
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
                    if opt in V1_CONTROLLERS:
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
