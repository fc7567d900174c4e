"""One cgroup per node, in every hierarchy that can freeze or account it.

Hosts differ: Debian 12 here is hybrid (v1 freezer/memory/pids + an empty cgroup2 at
/sys/fs/cgroup/unified), a Debian 13 host is usually cgroup2 only. We use whichever of v1
freezer, v1 memory, v1 pids and cgroup2 are mounted; the node's directory is ``memsnap/<name>``
in each.
"""
from __future__ import annotations

import os
from pathlib import Path

from memsnap import cgroupfs

# freezer, memory, pids: freezing and accounting a node. The rest: a kubelet in the node
# (`memsnap cluster`) insists on cpu, cpuacct, cpuset and name=systemd too, and runc uses devices.
V1_CONTROLLERS = ("freezer", "memory", "pids", "cpu", "cpuacct", "cpuset", "devices", "name=systemd")


def hierarchies() -> dict[str, Path]:
    return cgroupfs.hierarchies(V1_CONTROLLERS)


def paths(name: str) -> dict[str, Path]:
    return {kind: mount / "memsnap" / name for kind, mount in hierarchies().items()}


def create(name: str) -> dict[str, Path]:
    made = paths(name)
    for kind, path in made.items():
        if kind == "cpuset":  # a new cpuset starts empty and takes no task: inherit the parent's
            _mkdir_cpuset(path)
        path.mkdir(parents=True, exist_ok=True)
    return made


def _mkdir_cpuset(path: Path) -> None:
    for d in (path.parent, path):
        d.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if not (d / knob).read_text().strip():
                (d / knob).write_text((d.parent / knob).read_text())


def join(name: str, pid: int = 0) -> None:
    """Move ``pid`` (0 = the caller) into the node's cgroups."""
    for path in paths(name).values():
        if path.is_dir():
            (path / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")


def pids(name: str) -> set[int]:
    """Every task in the node's cgroups, sub-cgroups included."""
    return cgroupfs.tasks(paths(name).values())


def freeze(name: str, timeout: float = 10.0) -> None:
    """Freeze every task of the node (cgroup2's cgroup.freeze if there is one, else the v1 freezer)."""
    found = paths(name)
    kind = "cgroup2" if "cgroup2" in found else "freezer" if "freezer" in found else None
    if kind is None:
        raise RuntimeError("no freezer: neither cgroup2 nor the v1 freezer is mounted")
    cgroupfs.Freezer(found[kind], v2=kind == "cgroup2").freeze(timeout)


def thaw(name: str) -> None:
    """Undo freeze(), also of sub-cgroups frozen from inside the node (frozen tasks cannot even die)."""
    cgroupfs.thaw_all(paths(name).values())


def kill_all(name: str, timeout: float = 10.0) -> None:
    """SIGKILL every task in the node's cgroups and wait until they are gone."""
    cgroupfs.kill_tasks(paths(name).values(), f"cgroup of {name}", timeout)


def remove(name: str) -> None:
    """Remove the node's (empty) cgroups, sub-cgroups first."""
    for path in paths(name).values():
        for cg in cgroupfs.subtree(path):
            cgroupfs.rmdir(cg)
        parent = path.parent
        if parent.is_dir() and not any(p.is_dir() for p in parent.iterdir()):
            cgroupfs.rmdir(parent)  # the shared memsnap/ directory goes with the last node
