"""Auto-converge: take CPU away from a workload that dirties memory faster than the link
carries it, in growing steps (QEMU's cpu-throttle), through the CPU controller of its cgroup.

The tree gets a cpu cgroup of its own (memsnap-<pid>, beside its current one, as the freezer
does), so nothing else is slowed, and is put back when the migration ends either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import cgroupfs, procfs

PERIOD_US = 100_000


class ThrottleError(Exception):
    pass


@dataclass
class Throttle:
    path: Path
    v2: bool
    percent: int = 0

    @classmethod
    def for_tree(cls, root: int) -> Throttle:
        mounts = cgroupfs.hierarchies()
        kind = "cpu" if "cpu" in mounts else "cgroup2" if "cgroup2" in mounts else None
        if kind is None:
            raise ThrottleError("auto-converge needs the cgroup cpu controller, which is not mounted")
        here = mounts[kind] / cgroupfs.membership(root).get(kind, "/").lstrip("/")
        path = here if here.name == f"memsnap-{root}" else here / f"memsnap-{root}"
        path.mkdir(exist_ok=True)
        if kind == "cgroup2" and not (path / "cpu.max").exists():
            raise ThrottleError(f"the cpu controller is not enabled for {path} (cgroup2)")
        for pid in [root] + procfs.descendants(root):
            try:
                (path / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                pass
        return cls(path, kind == "cgroup2")

    def set(self, percent: int) -> None:
        """Leave the tree (100 - percent) % of one CPU."""
        quota = max(1000, PERIOD_US * (100 - percent) // 100)
        if self.v2:
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        self.percent = percent

    def reset(self) -> None:
        """Unthrottled, back in the cgroup it came from."""
        try:
            if self.v2:
                (self.path / "cpu.max").write_text(f"max {PERIOD_US}")
            else:
                (self.path / "cpu.cfs_quota_us").write_text("-1")
        except FileNotFoundError:
            return
        cgroupfs.leave(self.path)
