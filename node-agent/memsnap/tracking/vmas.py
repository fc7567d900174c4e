"""Which VMAs are tracked ("marked"), and how the set changes between rounds."""
from __future__ import annotations

from dataclasses import dataclass

from ..procfs import Mapping, read_maps
from .pages import PageRanges

#: Every kind of mapping memsnap can track; "special" ([vdso], [vvar], ...) never is.
KINDS = ("anon", "heap", "stack", "file", "shared-anon", "shared-file")
#: By default: private writable memory, i.e. what a checkpoint must save.
DEFAULT_KINDS = ("anon", "heap", "stack", "file")


@dataclass(frozen=True)
class VmaSelection:
    kinds: tuple[str, ...] = DEFAULT_KINDS

    @classmethod
    def parse(cls, text: str) -> VmaSelection:
        """'anon,heap' -> those kinds; 'all' -> every kind; 'default' -> DEFAULT_KINDS."""
        if text in ("", "default"):
            return cls()
        if text == "all":
            return cls(KINDS)
        kinds = tuple(k.strip() for k in text.split(",") if k.strip())
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown VMA kind {', '.join(unknown)} (known: {', '.join(KINDS)}, all)")
        return cls(kinds)

    def wants(self, m: Mapping) -> bool:
        return m.writable and m.kind in self.kinds

    def select(self, pid: int) -> list[Mapping]:
        return [m for m in read_maps(pid) if self.wants(m)]


@dataclass(frozen=True)
class VmaEvent:
    """A change to the tracked set: added, removed, grown, shrunk or moved."""

    kind: str
    start: int
    end: int
    path: str
    old_start: int = 0
    old_end: int = 0

    def as_dict(self) -> dict:
        d = {"event": self.kind, "start": hex(self.start), "end": hex(self.end), "path": self.path}
        if self.old_end:
            d.update(old_start=hex(self.old_start), old_end=hex(self.old_end))
        return d


def diff(before: list[Mapping], after: list[Mapping]) -> list[VmaEvent]:
    """Describe how the tracked VMAs changed, pairing resized and moved mappings."""
    old = {(m.start, m.end): m for m in before}
    new = {(m.start, m.end): m for m in after}
    gone = [m for key, m in old.items() if key not in new]
    came = [m for key, m in new.items() if key not in old]
    events: list[VmaEvent] = []
    for m in list(came):
        twin = _find_twin(m, gone)
        if twin is None:
            continue
        gone.remove(twin)
        came.remove(m)
        if twin.start == m.start or twin.end == m.end:
            kind = "grown" if m.size > twin.size else "shrunk"
        else:
            kind = "moved"
        events.append(VmaEvent(kind, m.start, m.end, m.path, twin.start, twin.end))
    events += [VmaEvent("added", m.start, m.end, m.path) for m in came]
    events += [VmaEvent("removed", m.start, m.end, m.path) for m in gone]
    return sorted(events, key=lambda e: e.start)


def _find_twin(m: Mapping, candidates: list[Mapping]) -> Mapping | None:
    """The mapping m most likely was: same start or end (resized), or same file and size (moved)."""
    for c in candidates:
        if c.path == m.path and (c.start == m.start or c.end == m.end):
            return c
    for c in candidates:
        if c.path == m.path and c.inode == m.inode and c.size == m.size and c.offset == m.offset:
            return c
    return None


def ranges_of(maps: list[Mapping]) -> PageRanges:
    return PageRanges((m.start, m.end) for m in maps)
