"""A tracking session: one target, or a process and its descendants, round after round."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .. import procfs
from ..kernel.pagemap import PAGE_SIZE
from . import registry
from .base import Backend, ProcessSample, TargetGone, TrackingError
from .pages import PageRanges
from .vmas import VmaSelection

log = logging.getLogger(__name__)


@dataclass
class Round:
    """The result of one round, over every tracked process."""

    time: float
    pid: int
    backend: str
    interval_seconds: float
    scan_seconds: float
    samples: list[ProcessSample]
    started: list[int] = field(default_factory=list)  # pids tracked from this round on
    ended: list[int] = field(default_factory=list)  # pids that exited

    @property
    def dirty_pages(self) -> int:
        return sum(s.dirty.pages for s in self.samples)

    @property
    def dirty_bytes(self) -> int:
        return self.dirty_pages * PAGE_SIZE

    @property
    def tracked_bytes(self) -> int:
        return sum(s.tracked_bytes for s in self.samples)

    @property
    def vmas(self) -> int:
        return sum(len(s.tracked) for s in self.samples)

    def count_events(self, *kinds: str) -> int:
        return sum(1 for s in self.samples for e in s.events if e.kind in kinds)

    def as_json(self) -> dict:
        return {
            "time": round(self.time, 6), "pid": self.pid, "backend": self.backend,
            "interval_seconds": round(self.interval_seconds, 6),
            "dirty_pages": self.dirty_pages, "dirty_bytes": self.dirty_bytes,
            "tracked_bytes": self.tracked_bytes, "vmas": self.vmas,
            "vmas_added": self.count_events("added", "replaced"),
            "vmas_removed": self.count_events("removed"),
            "scan_seconds": round(self.scan_seconds, 6),
            "lost": any(s.lost for s in self.samples),
            "processes": [{"pid": s.pid, "dirty_pages": s.dirty.pages, "tracked_bytes": s.tracked_bytes,
                           "vmas": len(s.tracked), "lost": s.lost} for s in self.samples],
            "events": [dict(e.as_dict(), pid=s.pid) for s in self.samples for e in s.events],
            "started": self.started, "ended": self.ended,
            "skipped": {f"{s.pid}:{k}": v for s in self.samples for k, v in s.skipped.items()},
        }


class TrackSession:
    """Tracks pid (and with tree=True its descendants, picking up new children each round).

    start() arms every process and returns their baselines; round() returns what each wrote
    since the previous round; stop() leaves every target as it was. Ends (raises TargetGone)
    once no tracked process is left.
    """

    def __init__(self, pid: int, backend: str = "auto", tree: bool = False,
                 selection: VmaSelection = VmaSelection()):
        self.pid = pid
        self.backend_name = backend
        self.tree = tree
        self.selection = selection
        self.trackers: dict[int, Backend] = {}
        self.why = ""
        self._last = 0.0

    @property
    def backend(self) -> str:
        first = next(iter(self.trackers.values()), None)
        return first.name if first else self.backend_name

    def start(self, recover: bool = True) -> dict[int, PageRanges]:
        """Arm the target(s). recover=False skips cleaning up after killed trackers (a
        long-running agent does that once, at its own start)."""
        registry.check_access(self.pid)
        if recover:
            registry.recover()
        tracker, baseline, self.why = registry.arm(self.pid, self.backend_name, self.selection)
        self.trackers[self.pid] = tracker
        baselines = {self.pid: baseline}
        if self.tree:
            baselines.update(self._adopt_children())
        self._last = time.monotonic()
        return baselines

    def round(self) -> Round:
        began = time.monotonic()
        samples, ended = [], []
        for pid, tracker in list(self.trackers.items()):
            try:
                samples.append(tracker.collect())
            except TargetGone:
                ended.append(pid)
                self._drop(pid)
        started = []
        if self.tree:
            for pid, baseline in self._adopt_children().items():
                started.append(pid)
                tracker = self.trackers[pid]
                samples.append(ProcessSample(pid, baseline, tracker.tracked, skipped=tracker.skipped))
        now = time.monotonic()
        result = Round(time.time(), self.pid, self.backend, now - self._last, now - began,
                       samples, started, ended)
        self._last = now
        if not self.trackers:
            raise TargetGone(f"pid {self.pid} exited", ) from None
        return result

    def stop(self) -> None:
        errors = []
        for pid in list(self.trackers):
            try:
                self._drop(pid)
            except Exception as exc:  # keep cleaning the others
                errors.append(f"pid {pid}: {exc}")
        if errors:
            raise TrackingError("cleanup failed for " + "; ".join(errors))

    def __enter__(self) -> TrackSession:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _drop(self, pid: int) -> None:
        tracker = self.trackers.pop(pid)
        tracker.close()

    def _adopt_children(self) -> dict[int, PageRanges]:
        """Arm descendants not yet tracked; a child that exits meanwhile is skipped."""
        baselines = {}
        for root in list(self.trackers):
            for child in procfs.descendants(root):
                if child in self.trackers:
                    continue
                try:
                    tracker, baseline, _ = registry.arm(child, self.backend, self.selection)
                except TrackingError as exc:
                    if procfs.alive(child):
                        log.warning("cannot track child %d: %s", child, exc)
                    continue
                self.trackers[child] = tracker
                baselines[child] = baseline
        return baselines


def open_session(pid: int, backend: str = "auto", tree: bool = False,
                 selection: VmaSelection = VmaSelection()) -> TrackSession:
    return TrackSession(pid, backend, tree, selection)
