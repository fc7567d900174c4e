"""A tracefs instance of our own that records the memsnap events.

Using an instance (``/sys/kernel/tracing/instances/<name>``) gives us ring
buffers, a size and counters nobody else touches.  Events are read either
from the instance's text ``trace_pipe`` (``Instance.read_events``) or, with
no formatting in the kernel, from the per-CPU binary ``trace_pipe_raw``
(``RawReader``); both consume and never block.  Loss shows two
ways: the per-CPU ``stats`` counters (overrun: overwritten when full;
dropped events: rejected when full in non-overwrite mode) and, for losses
no counter sees (recording off, event disabled or filtered), gaps in the
per-process event sequence numbers: see ``SeqCheck``.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import libc

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


_FIELD = re.compile(r"field:[^;]*?(\w+);\s*offset:(\d+);\s*size:(\d+);")
_MISSED_EVENTS = 1 << 31  # ring buffer page flag: events were lost before this page
_MISSED_STORED = 1 << 30  # ... and their count follows the data
_COMMIT_MASK = (1 << 30) - 1
_PADDING, _TIME_EXTEND, _TIME_STAMP = 29, 30, 31


class RawReader:
    """Reads the instance's per-CPU ``trace_pipe_raw``: ring buffer pages.

    Layouts come from tracefs (``events/header_page`` is fixed for 64-bit:
    u64 timestamp, u64 commit with the missed-events flags, data; each event
    is a u32 header of 5 bits type/length and 27 bits time delta), and the
    payload offsets from each event's ``format``.  Assumes a little-endian
    64-bit kernel.  ``missed`` counts events the pages say were lost.
    """

    def __init__(self, inst: Instance):
        events = inst.path / "events" / SYSTEM
        self._layout = {int((events / n / "id").read_text()): (n, self._offsets(events / n))
                        for n in EVENTS}
        subbuf = inst.path / "buffer_subbuf_size_kb"
        self._page = int(subbuf.read_text()) * 1024 if subbuf.exists() else 4096
        self._fds = {int(d.name[3:]): os.open(d / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK)
                     for d in (inst.path / "per_cpu").iterdir()}
        self.missed = 0

    @staticmethod
    def _offsets(event_dir: Path) -> tuple[int, int, int, int]:
        fields = {m[1]: int(m[2]) for m in _FIELD.finditer((event_dir / "format").read_text())}
        second = "start" if "start" in fields else "addr"
        third = "end" if "end" in fields else "size"
        return fields["seq"], fields[second], fields[third], fields["pid"]

    def read_events(self) -> list[Event]:
        """Everything recorded so far on every CPU, consumed, in time order."""
        events: list[Event] = []
        for cpu, fd in self._fds.items():
            while True:
                try:
                    page = os.read(fd, self._page)
                except BlockingIOError:
                    break
                if not page:
                    break
                events.extend(self._parse_page(page, cpu))
        return sorted(events, key=lambda e: e.ts)

    def _parse_page(self, page: bytes, cpu: int) -> Iterator[Event]:
        page += b"\0" * 8  # so a header at the very end still unpacks
        ts, commit = struct.unpack_from("<QQ", page, 0)
        size = commit & _COMMIT_MASK
        if commit & _MISSED_EVENTS:
            stored = commit & _MISSED_STORED and 16 + size + 8 <= len(page)
            self.missed += struct.unpack_from("<Q", page, 16 + size)[0] if stored else 1
        off, end = 16, 16 + size
        while off < end:
            header, array0 = struct.unpack_from("<II", page, off)
            kind, delta = header & 0x1F, header >> 5
            if kind == _PADDING:
                if delta == 0:
                    break  # the rest of the page is unused
                off += 4 + array0
            elif kind == _TIME_EXTEND:
                ts += (array0 << 27) + delta
                off += 8
            elif kind == _TIME_STAMP:
                ts = (array0 << 27) | delta
                off += 8
            else:
                ts += delta
                data, length = (off + 4, kind * 4) if kind else (off + 8, array0 - 4)
                event = self._decode(page, data, cpu, ts)
                if event is not None:
                    yield event
                off = data + length

    def _decode(self, page: bytes, data: int, cpu: int, ts: int) -> Event | None:
        (event_id,) = struct.unpack_from("<H", page, data)
        if event_id not in self._layout:
            return None
        name, (seq_off, a_off, b_off, pid_off) = self._layout[event_id]
        seq, a, b = (struct.unpack_from("<Q", page, data + o)[0] for o in (seq_off, a_off, b_off))
        (pid,) = struct.unpack_from("<i", page, data + pid_off)
        end = a + b if name == "page_written" else b
        return Event(name, pid, seq, a, end, cpu, ts / 1e9)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


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




@functools.cache
def event_id(system: str, name: str) -> int:
    """A trace event's id, for perf_event_open. From the mounted tracefs, or else (a node's agent
    sees none) from a private mount made for the lookup and removed at once. Raises OSError
    when the kernel has no such event."""
    mounted = TRACEFS / "events" / system / name / "id"
    if mounted.exists():
        return int(mounted.read_text())
    with tempfile.TemporaryDirectory(prefix="memsnap-tracefs-") as where:
        libc.mount("tracefs", where, "tracefs")
        try:
            return int((Path(where) / "events" / system / name / "id").read_text())
        finally:
            libc.umount(where, libc.MNT_DETACH)
