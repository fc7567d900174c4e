"""A chain kept flat as its layers arrive: a migration target's copy of the pre-copied memory.

Each pre-copy layer's pagemap describes every page the chain holds, in-parent runs between
the runs it holds itself; after a long round on a big workload that is tens of thousands of
entries per layer, and CRIU's restore and its lazy-pages daemon decode every entry of every
layer before the workload runs. Here the layers are merged, as they arrive, into *segments*
in O(pages of the layer):

- a page a segment holds already is overwritten where it lies (copy_file_range, in place);
- pages no segment holds (memory mapped since) go into a new segment on top, whose pagemap
  refers to the segments below for everything else, one in-parent entry per run.

Every page is held by exactly one segment (its owner), and each segment's pagemap has one
entry per run of memory, so the chain a restore reads is the final layer plus a few small
pagemaps, whatever the number of rounds. A layer merged in keeps its directory and manifest
(its name stays taken) but not its pages; a layer built on one (the final) has its parent
link pointed at the top segment. Segments are this node's own derived data: their manifests
list no checksums (the pages change in place; every received file was checked on arrival).
"""
from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..kernel.pagemap import PAGE_SIZE as PAGE
from . import criu_format as cf
from .layer import MANIFEST, LayerError, Manifest, read_manifest

HOW = "merged on this node as the layers arrived: pages updated in place"


@dataclass(frozen=True)
class _Run:
    """[start, end) held by segment seg at byte offset `offset` of its pages file."""
    start: int
    end: int
    seg: int
    offset: int


@dataclass
class _Owners:
    """Which segment holds each page of one process: disjoint runs, sorted by address."""
    runs: list[_Run] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    def add(self, run: _Run) -> None:
        i = bisect.bisect_left(self.starts, run.start)
        self.runs.insert(i, run)
        self.starts.insert(i, run.start)

    def split(self, start: int, end: int):
        """[start, end) as consecutive (start, end, owner run or None) pieces."""
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        pos = start
        while pos < end:
            run = self.runs[i] if i < len(self.runs) else None
            if run is None or run.start >= end:
                yield pos, end, None
                return
            if run.end <= pos:
                i += 1
                continue
            if run.start > pos:
                yield pos, run.start, None
                pos = run.start
            stop = min(end, run.end)
            yield pos, stop, run
            pos, i = stop, i + 1

    def described(self) -> list[tuple[int, int]]:
        """Every page held, as coalesced [start, end) runs."""
        out: list[list[int]] = []
        for r in self.runs:
            if out and out[-1][1] == r.start:
                out[-1][1] = r.end
            else:
                out.append([r.start, r.end])
        return [(s, e) for s, e in out]


class FlatChain:
    """The pre-copy layers of one chain, merged into segments `<prefix>flat<N>` beside them."""

    def __init__(self, root: Path, prefix: str = ""):
        self.root, self.prefix = root, prefix
        self.segments: list[Path] = []
        self.owners: dict[int, _Owners] = {}  # image id -> its pages' owners
        self.files: dict[tuple[int, int], Path] = {}  # (segment, image id) -> its pages file
        self.merged: set[str] = set()  # names of the layers merged in
        self.lock = threading.Lock()

    @property
    def top(self) -> Path | None:
        return self.segments[-1] if self.segments else None

    def add(self, layer: Path) -> None:
        """Merge the committed pre-copy layer in: its pages go to their owners or into a new
        segment; then its own pagemaps and pages are removed."""
        with self.lock:
            manifest = read_manifest(layer)
            if manifest.parent is None:
                self._restart(layer)
            elif Path(manifest.parent).name not in self.merged:
                raise LayerError(f"{layer.name}: its parent {manifest.parent} was not merged on this node")
            else:
                self._merge(layer)
            self.merged.add(layer.name)
            for pid in cf.pagemap_pids(layer):
                _drop_process(layer, pid)

    def relink(self, layer: Path) -> bool:
        """Point layer's parent link at the top segment if its parent was merged in; whether it did."""
        manifest = read_manifest(layer)
        if manifest.parent is None or Path(manifest.parent).name not in self.merged or self.top is None:
            return False
        link = layer / "parent"
        tmp = layer / ".parent.tmp"
        os.symlink(os.path.relpath(self.top, layer), tmp)
        os.replace(tmp, link)
        return True

    # -- merging ------------------------------------------------------------------------------

    def _restart(self, layer: Path) -> None:
        """A full layer: it becomes segment 0 (its files are renamed, not copied)."""
        self.segments, self.owners, self.files = [], {}, {}
        seg = self._new_segment()
        for pid in cf.pagemap_pids(layer):
            pagemap = cf.read_pagemap(cf.pagemap_path(layer, pid))
            if any(not f & cf.PE_PRESENT for _, _, f in pagemap.entries):
                raise LayerError(f"{layer.name}: a layer without a parent refers to one (pid {pid})")
            os.rename(cf.pagemap_path(layer, pid), cf.pagemap_path(seg, pid))
            os.rename(cf.pages_path(layer, pagemap.pages_id), cf.pages_path(seg, pagemap.pages_id))
            self.files[0, pid] = cf.pages_path(seg, pagemap.pages_id)
            owners = self.owners.setdefault(pid, _Owners())
            offset = 0
            for vaddr, nr, _ in pagemap.entries:
                owners.add(_Run(vaddr, vaddr + nr * PAGE, 0, offset))
                offset += nr * PAGE
        self._publish(seg, parent=None)

    def _merge(self, layer: Path) -> None:
        fresh: dict[int, list[tuple[int, int, int]]] = {}  # pid -> (start, end, offset in the layer) owned by nobody
        for pid in cf.pagemap_pids(layer):
            pagemap = cf.read_pagemap(cf.pagemap_path(layer, pid))
            owners = self.owners.setdefault(pid, _Owners())
            with open(cf.pages_path(layer, pagemap.pages_id), "rb") as src:
                fresh[pid] = self._overwrite(src.fileno(), pid, pagemap, owners)
        if any(fresh.values()):
            self._add_segment(layer, fresh)

    def _overwrite(self, src: int, pid: int, pagemap: cf.Pagemap, owners: _Owners) -> list[tuple[int, int, int]]:
        """Copy the layer's pages over their owners' copies; returns the pages nobody holds."""
        fresh, offset, files = [], 0, {}
        try:
            for vaddr, nr, flags in pagemap.entries:
                if not flags & cf.PE_PRESENT:
                    continue
                end = vaddr + nr * PAGE
                for start, stop, run in owners.split(vaddr, end):
                    at = offset + start - vaddr
                    if run is None:
                        fresh.append((start, stop, at))
                        continue
                    if run.seg not in files:
                        files[run.seg] = os.open(self.files[run.seg, pid], os.O_WRONLY)
                    _copy(src, files[run.seg], stop - start, at, run.offset + start - run.start)
                offset += nr * PAGE
        finally:
            for fd in files.values():
                os.close(fd)
        return fresh

    def _add_segment(self, layer: Path, fresh: dict[int, list[tuple[int, int, int]]]) -> None:
        """A segment holding the pages nobody held, in-parent entries for all the others, and a
        pagemap for every process the segments hold (CRIU stops looking up a chain at a layer
        without the process's pagemap)."""
        below = self.top
        seg = self._new_segment()
        index = len(self.segments) - 1
        for pid, owners in sorted(self.owners.items()):
            pages_id = pid
            new = fresh.get(pid, [])
            held = owners.described()
            entries = sorted([(s, (e - s) // PAGE, cf.PE_PARENT) for s, e in held]
                             + [(s, (e - s) // PAGE, cf.PE_PRESENT) for s, e, _ in new])
            cf.write_pagemap(cf.pagemap_path(seg, pid), cf.Pagemap(pages_id, entries))
            self._write_fresh(layer, pid, seg, pages_id, new, owners, index)
        self._publish(seg, parent=below)

    def _write_fresh(self, layer: Path, pid: int, seg: Path, pages_id: int, new: list[tuple[int, int, int]],
                     owners: _Owners, index: int) -> None:
        pagemap = cf.read_pagemap(cf.pagemap_path(layer, pid)) if new else None
        self.files[index, pid] = cf.pages_path(seg, pages_id)
        dst = os.open(self.files[index, pid], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if pagemap is None:
                return
            with open(cf.pages_path(layer, pagemap.pages_id), "rb") as src:
                out = 0
                for start, end, at in new:  # address order: as the pagemap lists them
                    _copy(src.fileno(), dst, end - start, at, out)
                    owners.add(_Run(start, end, index, out))
                    out += end - start
        finally:
            os.close(dst)

    # -- segments -----------------------------------------------------------------------------

    def _new_segment(self) -> Path:
        seg = self.root / f"{self.prefix}flat{len(self.segments)}"
        if seg.exists():
            raise LayerError(f"{seg} exists already")
        seg.mkdir(mode=0o700)
        self.segments.append(seg)
        return seg

    def _publish(self, seg: Path, parent: Path | None) -> None:
        rel = os.path.relpath(parent, seg) if parent is not None else None
        if rel is not None:
            os.symlink(rel, seg / "parent")
        pages = sum(r.end - r.start for o in self.owners.values() for r in o.runs
                    if self.segments[r.seg] == seg) // PAGE
        manifest = Manifest(kind="incremental" if parent else "full", parent=rel, pids=sorted(self.owners),
                            backend="merged", pages=pages, bytes=pages * PAGE,
                            described_pages=sum(r.end - r.start for o in self.owners.values() for r in o.runs) // PAGE,
                            how=HOW)
        (seg / MANIFEST).write_text(manifest.to_json())
        os.chmod(seg / MANIFEST, 0o600)


def _drop_process(layer: Path, pid: int) -> None:
    path = cf.pagemap_path(layer, pid)
    pages_id = cf.read_pagemap(path).pages_id
    cf.pages_path(layer, pages_id).unlink(missing_ok=True)
    path.unlink()


def _copy(src: int, dst: int, count: int, src_at: int, dst_at: int) -> None:
    """count bytes from src at src_at to dst at dst_at, in the kernel where it can."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, count, src_at, dst_at)
        except OSError:
            n = 0
        if n <= 0:  # not supported here, or the source ended early: copy through a buffer
            data = os.pread(src, count, src_at)
            if not data:
                raise LayerError(f"a layer's pages file ends {count} bytes short")
            n = os.pwrite(dst, data, dst_at)
        count, src_at, dst_at = count - n, src_at + n, dst_at + n
