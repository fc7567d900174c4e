"""A tracefs instance of our own that records the memsnap events.

Using an instance (``/sys/kernel/tracing/instances/<name>``) gives us ring
buffers, a size and counters nobody else touches.  Events are read from the
instance's text ``trace_pipe`` (consuming, non-blocking).  Loss shows two
ways: the per-CPU ``stats`` counters (overrun: overwritten when full;
dropped events: rejected when full in non-overwrite mode) and, for losses
no counter sees (recording off, event disabled or filtered), gaps in the
per-process event sequence numbers: see ``SeqCheck``.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
SYSTEM = "memsnap"
EVENTS = ("vma_marked", "vma_unmarked", "vma_removed", "page_written")
DEFAULT_INSTANCE = "memsnap"

_LINE = re.compile(
    r"\[(?P<cpu>\d+)\]\s+(?:\S+\s+)?(?P<ts>\d+\.\d+): (?P<name>\w+): pid=(?P<pid>-?\d+) "
    r"seq=(?P<seq>\d+) (?:start|addr)=0x(?P<start>[0-9a-f]+) "
    r"(?:end=0x(?P<end>[0-9a-f]+)|size=(?P<size>\d+))$")


@dataclass(frozen=True)
class Event:
    """One memsnap event; for page_written, [start, end) is what may have changed."""
    name: str
    pid: int
    seq: int
    start: int
    end: int
    cpu: int
    ts: float


@dataclass(frozen=True)
class CpuStats:
    cpu: int
    entries: int
    overrun: int
    commit_overrun: int
    dropped: int

    @property
    def lost(self) -> int:
        return self.overrun + self.commit_overrun + self.dropped


def parse_line(line: str) -> Event | None:
    """Parse one trace_pipe line; None for anything that is not a memsnap event."""
    m = _LINE.search(line.rstrip("\n"))
    if not m or m["name"] not in EVENTS:
        return None
    start = int(m["start"], 16)
    end = int(m["end"], 16) if m["end"] is not None else start + int(m["size"])
    return Event(m["name"], int(m["pid"]), int(m["seq"]), start, end,
                 int(m["cpu"]), float(m["ts"]))


class Instance:
    """A tracefs instance recording only the memsnap events."""

    def __init__(self, name: str = DEFAULT_INSTANCE, tracefs: Path = TRACEFS):
        self.path = tracefs / "instances" / name
        self._pipe: int | None = None
        self._partial = b""

    @classmethod
    def create(cls, name: str = DEFAULT_INSTANCE, buffer_kb: int | None = None,
               tracefs: Path = TRACEFS) -> Instance:
        """Create the instance afresh (a stale one is removed: fresh counters)."""
        if not (tracefs / "events" / SYSTEM).is_dir():
            raise RuntimeError(f"{tracefs}/events/{SYSTEM} missing: "
                               "not a memsnap kernel, or tracefs not mounted")
        inst = cls(name, tracefs)
        if inst.path.exists():
            inst.remove()
        inst.path.mkdir()
        if buffer_kb is not None:
            inst.set_buffer_kb(buffer_kb)
        inst.enable()
        return inst

    def _write(self, rel: str, value: str) -> None:
        (self.path / rel).write_text(value)

    def set_buffer_kb(self, kb: int) -> None:
        """Per-CPU ring buffer size (the kernel rounds up to whole pages)."""
        self._write("buffer_size_kb", str(kb))

    def enable(self) -> None:
        self._write(f"events/{SYSTEM}/enable", "1")
        self._write("tracing_on", "1")

    def disable(self) -> None:
        self._write(f"events/{SYSTEM}/enable", "0")

    def read_events(self) -> list[Event]:
        """Everything recorded so far, consumed; never blocks."""
        return [e for e in map(parse_line, self._read_lines()) if e is not None]

    def _read_lines(self) -> Iterator[str]:
        if self._pipe is None:
            self._pipe = os.open(self.path / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        while True:
            try:
                chunk = os.read(self._pipe, 1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not chunk:
                return
            data = self._partial + chunk
            *lines, self._partial = data.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")

    def stats(self) -> list[CpuStats]:
        """The per-CPU ring buffer counters (cumulative since creation)."""
        return [self._cpu_stats(d) for d in sorted((self.path / "per_cpu").iterdir(),
                                                   key=lambda p: int(p.name[3:]))]

    def _cpu_stats(self, cpu_dir: Path) -> CpuStats:
        fields = {}
        for line in (cpu_dir / "stats").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        return CpuStats(int(cpu_dir.name[3:]), int(fields["entries"]), int(fields["overrun"]),
                        int(fields["commit overrun"]), int(fields["dropped events"]))

    def lost(self) -> int:
        """Events the ring buffers lost since the instance was created."""
        return sum(s.lost for s in self.stats())

    def close(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None

    def remove(self) -> None:
        """Disable and delete the instance (rmdir; its files cannot be unlinked)."""
        self.close()
        if self.path.exists():
            try:
                self.disable()
            except OSError:
                pass
            os.rmdir(self.path)

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class SeqCheck:
    """Detect lost events from the per-process sequence numbers.

    Every memsnap event of an address space carries the next number of a
    counter that the kernel advances even when the event is not recorded.
    Feed all events (any order within a read); ``missing(pid)`` lists the
    numbers not seen between the first and the highest seen.  Numbers above
    the highest seen cannot be known missing until a later event arrives, so
    close a round with an event you expect (the vma_marked of your re-arm).
    """

    def __init__(self) -> None:
        self._seen: dict[int, set[int]] = {}

    def add(self, events: Iterable[Event]) -> None:
        for e in events:
            self._seen.setdefault(e.pid, set()).add(e.seq)

    def missing(self, pid: int, since: int = 0) -> list[int]:
        """Numbers in (since, highest seen] never seen for ``pid``."""
        seen = self._seen.get(pid, set())
        if not seen:
            return []
        return [s for s in range(since + 1, max(seen) + 1) if s not in seen]


def remove_instance(name: str = DEFAULT_INSTANCE, tracefs: Path = TRACEFS) -> None:
    """Remove a leftover instance by name, if any."""
    path = tracefs / "instances" / name
    if path.exists():
        Instance(name, tracefs).remove()


