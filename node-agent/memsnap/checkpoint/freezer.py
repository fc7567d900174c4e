"""Freezing a process tree with the cgroup freezer (v1 freezer or cgroup2 cgroup.freeze).

A target is frozen in a cgroup of its own: memsnap makes one (memsnap-<pid>) beside the
target's current cgroup and moves the tree into it, so nothing else in the old cgroup stops.
"""
from __future__ import annotations

from .. import cgroupfs, procfs
from ..cgroupfs import Freezer, FreezeError

__all__ = ["Freezer", "FreezeError", "own_cgroup"]


def own_cgroup(root: int) -> Freezer:
    """A freezer cgroup holding exactly root and its descendants."""
    mounts = cgroupfs.hierarchies()
    member = cgroupfs.membership(root)
    if "freezer" in mounts:
        base, v2 = mounts["freezer"], False
        current = member.get("freezer", "/")
    elif "cgroup2" in mounts:
        base, v2 = mounts["cgroup2"], True
        current = member.get("cgroup2", "/")
    else:
        raise FreezeError("no cgroup freezer is mounted (neither v1 freezer nor cgroup2)")
    here = base / current.lstrip("/")
    if here.name == f"memsnap-{root}":
        return Freezer(here, v2)
    path = here / f"memsnap-{root}"
    path.mkdir(exist_ok=True)
    for pid in [root] + procfs.descendants(root):
        try:
            (path / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            pass
    return Freezer(path, v2)
