"""What every tracking backend provides, for one process (one mm)."""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import ClassVar

from .. import procfs
from ..procfs import Mapping
from .pages import PageRanges
from .vmas import VmaEvent, VmaSelection, diff, ranges_of


class TrackingError(Exception):
    """Tracking cannot start or go on; the message names the missing feature or permission."""


class TargetGone(TrackingError):
    """The target exited (or exec'd, when raised by a backend that cannot follow exec)."""


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str


@dataclass
class ProcessSample:
    """One process's result for one round."""

    pid: int
    dirty: PageRanges
    tracked: list[Mapping]
    events: list[VmaEvent] = field(default_factory=list)
    lost: bool = False  # the backend lost information and over-reported to stay exact
    skipped: dict[str, str] = field(default_factory=dict)  # "start-end" -> why not tracked

    @property
    def tracked_bytes(self) -> int:
        return sum(m.size for m in self.tracked)


class Backend(abc.ABC):
    """Tracks one process. arm() once, collect() each round, close() at the end.

    collect() returns the pages written since the previous arm()/collect() and re-arms them, so
    that every write lands in exactly one round. A backend must never under-report: when it
    cannot tell, it reports more.
    """

    name: ClassVar[str]

    def __init__(self, pid: int, selection: VmaSelection):
        self.pid = pid
        self.selection = selection
        self.starttime = procfs.read_stat(pid).starttime if procfs.alive(pid) else 0
        self.tracked: list[Mapping] = []
        self.skipped: dict[str, str] = {}
        self._claim = None  # state.Claim: this tracker's ownership of the target, while armed

    @classmethod
    @abc.abstractmethod
    def availability(cls) -> Availability:
        """Whether this kernel (and this agent's privileges) can run the backend at all."""

    def arm(self) -> PageRanges:
        """Start tracking; returns the pages that hold data now (the baseline a full dump needs).

        Takes the target's claim first (one tracker per target); on any failure the target is
        left as it was.
        """
        from .state import Claim  # state needs this module's errors
        self._claim = Claim(self.pid, self.starttime)
        try:
            return self._arm()
        except BaseException:
            self.close()
            raise

    @abc.abstractmethod
    def _arm(self) -> PageRanges:
        """The backend's own arming, with the claim held."""

    @abc.abstractmethod
    def collect(self) -> ProcessSample:
        """Pages written since the last arm()/collect(), atomically re-armed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop tracking and leave the target exactly as it was. Idempotent."""

    def park(self, pending: PageRanges = PageRanges()) -> None:
        """Leave the target armed for a later resume() by another run (checkpoint chains).

        `pending` are pages collected but not yet saved: the resumed tracker reports them again.
        """
        raise TrackingError(f"the {self.name} backend cannot stay armed between runs")

    @classmethod
    def resume(cls, pid: int, selection: VmaSelection) -> Backend:
        """Take over a target parked by park(); its next collect() reports every write since."""
        raise TrackingError(f"the {cls.name} backend cannot stay armed between runs")

    def drop_target_fd(self) -> None:
        """Remove from the target anything a checkpointer cannot dump; tracking goes on."""

    # Shared helpers

    @staticmethod
    def pages_with(scanner, anyof: int, ranges) -> PageRanges:
        """The pages in `ranges` ((start, end) pairs) in any of the PAGEMAP_SCAN categories."""
        return PageRanges((s, e) for start, end in ranges
                          for s, e, _ in scanner.scan(start, end, anyof_mask=anyof, return_mask=anyof))

    def release_claim(self, keep_state: bool = False) -> None:
        if self._claim is not None:
            self._claim.release(keep_state)
            self._claim = None

    def refresh_vmas(self) -> tuple[list[Mapping], list[VmaEvent]]:
        """The selected VMAs now, and how they changed since the last call."""
        try:
            now = self.selection.select(self.pid)
        except (FileNotFoundError, ProcessLookupError):
            raise TargetGone(f"pid {self.pid} exited") from None
        events = diff(self.tracked, now)
        return now, events

    def tracked_ranges(self) -> PageRanges:
        return ranges_of(self.tracked)

    def open_pagemap(self) -> int:
        """This target's /proc/PID/pagemap, or a TrackingError saying why not."""
        try:
            return os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            raise TrackingError(f"not permitted to read pid {self.pid}'s page tables: "
                                "needs root or CAP_SYS_PTRACE") from None
        except FileNotFoundError:
            raise TargetGone(f"no process with pid {self.pid}") from None

    @staticmethod
    def mm_alive(pagemap_fd: int) -> bool:
        """False once the address space a pagemap fd was opened on is gone (exec or exit)."""
        try:
            return len(os.pread(pagemap_fd, 8, 0)) == 8
        except OSError:
            return False

    def check_alive(self) -> None:
        if not procfs.alive(self.pid, self.starttime):
            raise TargetGone(f"pid {self.pid} exited")
