"""Freezing a process tree with the cgroup freezer (v1 freezer or cgroup2 cgroup.freeze).

A target is frozen in a cgroup of its own: memsnap makes one (memsnap-<pid>) beside the
target's current cgroup and moves the tree into it, so nothing else in the old cgroup stops.
"""
from __future__ import annotations

from pathlib import Path

from .. import cgroupfs, procfs
from ..cgroupfs import Freezer, FreezeError

__all__ = ["Freezer", "FreezeError", "of", "own_cgroup", "frozen_by_us"]


def _freezer_mount() -> tuple[Path, bool, str]:
    mounts = cgroupfs.hierarchies()
    if "freezer" in mounts:
        return mounts["freezer"], False, "freezer"
    if "cgroup2" in mounts:
        return mounts["cgroup2"], True, "cgroup2"
    raise FreezeError("no cgroup freezer is mounted (neither v1 freezer nor cgroup2)")


def of(pid: int) -> Freezer:
    """The freezer cgroup pid sits in now."""
    base, v2, kind = _freezer_mount()
    member = cgroupfs.membership(pid)
    if kind not in member:
        raise FreezeError(f"pid {pid} is in no {kind} cgroup")
    return Freezer(base / member[kind].lstrip("/"), v2)


def frozen_by_us(root: int) -> Freezer | None:
    """The freezer cgroup memsnap made for root, if root sits in one."""
    here = of(root)
    return here if here.path.name == f"memsnap-{root}" else None


def own_cgroup(root: int) -> Freezer:
    """A freezer cgroup holding exactly root and its descendants."""
    mine = frozen_by_us(root)
    if mine is not None:
        return mine
    here = of(root)
    path = here.path / f"memsnap-{root}"
    path.mkdir(exist_ok=True)
    for pid in [root] + procfs.descendants(root):
        try:
            (path / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            pass
    return Freezer(path, here.v2)
