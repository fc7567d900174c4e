"""Freezing a process tree with the cgroup freezer (v1 freezer or cgroup2 cgroup.freeze).

A target is frozen in a cgroup of its own: memsnap makes one (memsnap-<pid>) beside the
target's current cgroup and moves the tree into it, so nothing else in the old cgroup stops.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import cgroupfs, procfs


class FreezeError(Exception):
    pass


@dataclass
class Freezer:
    path: Path
    v2: bool

    def freeze(self, timeout: float = 10.0) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1")
        else:
            (self.path / "freezer.state").write_text("FROZEN")
        self._wait(True, timeout)

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
        """Drop the cgroup once nothing is left in it (after a final dump stopped the tree)."""
        try:
            self.path.rmdir()
        except OSError:
            pass

    def _wait(self, want: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.frozen() != want:
            if time.monotonic() > deadline:
                self.thaw()
                raise FreezeError(f"{self.path} did not freeze within {timeout} s")
            time.sleep(0.0005)


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
