"""The final layer: freeze, let CRIU dump, keep only what changed.

With memsnap's CRIU (`--track-mem-uffd`, node-agent/criu) and a chain whose every process is
tracked by uffd-wp, CRIU itself writes only the pages written since the last layer: memsnap's
tracker keeps the write-protection alive through the dump and CRIU reads it, so the freeze
costs what changed, not the size of memory. Otherwise CRIU dumps every page and memsnap turns
that into a delta: a page the chain already holds and that was not written since the last
layer becomes in-parent. Either way the workload stands still from the freeze to the end of
the dump; if anything fails it is thawed and runs on.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import cgroupfs, procfs
from ..images import chain
from ..images import criu_format as cf
from ..images.layer import LayerWriter, Manifest
from ..images.pages_io import PAGE
from ..tracking import VmaSelection, registry
from ..tracking.base import Backend
from ..tracking.pages import PageRanges
from ..tracking.uffd_wp import UffdWp
from ..tracking.vmas import ranges_of
from . import criu
from .freezer import Freezer, own_cgroup
from .layers import described_in
from .layers import entries as layer_entries
from .vmflags import EarlyVmFlags


def write(root: int, target: Path, parent: Path | None, selection: VmaSelection = VmaSelection(),
          leave_running: bool = False, on_freeze: Callable[[], None] | None = None,
          untrack_later: list[Backend] | None = None, durable: bool = True,
          early_flags: EarlyVmFlags | None = None) -> Path:
    """With leave_running the tree stays frozen (in own_cgroup(root)) after a successful dump,
    for the caller to end or thaw (a migration ends it once the target runs it); otherwise
    memsnap kills it once the layer is committed (outside the freeze it reports). on_freeze() is called the moment the tree is frozen (where a pause starts).
    With leave_running and untrack_later, a successful write hands its trackers over in that
    list instead of closing them: closing walks every tracked page (smaps, unregister), which
    a migration does once the pause is over, and must do before it thaws the tree.
    durable=False: not fsynced (see LayerWriter), for a layer that lives as long as a migration.
    early_flags: VMA flags read earlier (checkpoint/vmflags.py), brought up to date here and
    closed when done; by default they are read while CRIU starts."""
    flags = early_flags or EarlyVmFlags([])
    try:
        return _write(root, target, parent, selection, leave_running, on_freeze, untrack_later, durable, flags)
    finally:
        flags.close()


def _write(root: int, target: Path, parent: Path | None, selection: VmaSelection, leave_running: bool,
           on_freeze: Callable[[], None] | None, untrack_later: list[Backend] | None, durable: bool,
           flags: EarlyVmFlags) -> Path:
    if parent is not None:
        # Links only: hashing the whole chain here would delay the freeze, and every page
        # written meanwhile lands in the final layer; restore checks every checksum.
        chain.load(parent, verify=False)
    pids = [root] + procfs.descendants(root)
    trackers = {pid: registry.resume(pid, selection) for pid in pids if registry.parked_backend(pid)}
    freezer = own_cgroup(root)
    try:
        with LayerWriter(target, durable) as out:
            for t in trackers.values():
                t.drop_target_fd()  # CRIU cannot dump a userfaultfd; our duplicate keeps tracking
            dump = _Dump(root, freezer, on_freeze)
            if parent is not None and _criu_takes_delta(parent, pids, trackers):
                manifest = _dump_delta(dump, out, parent, trackers, flags, cross_check=not leave_running)
            else:
                manifest = _dump_whole(dump, pids, out, parent, trackers)
            layer = out.commit(manifest)
        if not leave_running:
            # CRIU left the tree frozen: ended only now, its memory freed outside the freeze.
            cgroupfs.kill_tasks([freezer.path], f"pid {root}'s tree")
        elif untrack_later is not None:
            untrack_later.extend(trackers.values())
            trackers.clear()
        for t in trackers.values():
            t.close()
        if not leave_running:
            freezer.remove()
        return layer
    except BaseException:
        for t in trackers.values():
            t.close()
        if procfs.alive(root):
            freezer.thaw()
        raise


def _criu_takes_delta(parent: Path, pids: list[int], trackers: dict[int, Backend]) -> bool:
    """CRIU can read the dirty bits itself: every process is uffd-wp tracked since the parent,
    the parent tells CRIU its time (inventory.img), and this CRIU knows --track-mem-uffd."""
    return (set(trackers) == set(pids) and all(isinstance(t, UffdWp) for t in trackers.values())
            and (parent / "inventory.img").is_file() and criu.has_uffd_tracking())


@dataclass
class _Dump:
    """The tree being dumped: frozen in freezer, and left frozen after the dump."""

    root: int
    freezer: Freezer
    on_freeze: Callable[[], None] | None

    def freeze(self) -> _Phases:
        clock = _Phases()
        self.freezer.freeze()
        if self.on_freeze is not None:
            self.on_freeze()
        clock.mark("freeze")
        return clock

    def ids(self, pids) -> dict[int, int]:
        return procfs.image_ids(self.root, sorted(pids))  # CRIU names tasks by their pid in root's namespace


def _dump_delta(dump: _Dump, out: LayerWriter, parent: Path, trackers: dict[int, Backend],
                flags: EarlyVmFlags, cross_check: bool) -> Manifest:
    """CRIU writes the pages written since the parent and refers to the parent for the rest.
    cross_check: the manifest's dirty_pages compares the tracker's count of written pages
    with the pages CRIU wrote in tracked memory; both walk what was written, which a
    migration, whose tree stays frozen until the target runs, leaves out of its pause."""
    ids = dump.ids(trackers)
    holds = {pid: described_in(parent, ids[pid]) for pid in trackers}  # before the freeze: it waits for nobody
    rel = out.link_parent(parent)
    for pid, t in trackers.items():
        t.prepare_hand_over(holds[pid])  # while it runs: what is left for the freeze is small
    clock: _Phases | None = None
    early: list[int] = []

    def freeze_and_hand_over() -> None:  # CRIU is set up and waits for this
        nonlocal clock, early
        clock = dump.freeze()
        early = flags.settle()
        for pid, t in trackers.items():
            t.hand_over(holds[pid])
        clock.mark("collect")

    criu.dump_tracked(dump.root, out.dir, rel, dump.freezer.path, freeze_and_hand_over,
                      flags.dir if flags.wanted else None, lambda: flags.read(sorted(trackers)))
    clock.mark("criu dump")
    frozen_for = clock.total()
    stats = criu.dump_stats(out.dir)
    clock.split("criu dump", _memory_seconds(stats), "criu state dump", "memory delta")
    pages = stats.get("pages_written", 0) + stats.get("pages_lazy", 0)
    described = pages + stats.get("pages_skipped_parent", 0)  # the in-parent entries' pages
    dirty: dict[str, int] = {}
    if cross_check:
        tracked = {ids[pid]: ranges_of(t.tracked) for pid, t in trackers.items()}
        dirty = {"tracker": sum(t.written().pages for t in trackers.values()),  # still frozen, past the dump
                 "criu_in_tracked": _written_in(out.dir, tracked)}
    return Manifest(kind="final", parent=rel, pids=sorted(trackers), backend="uffd-wp+criu",
                    pages=pages, bytes=pages * PAGE, described_pages=described,
                    freeze_seconds=round(frozen_for, 6),
                    how="criu --track-mem-uffd: CRIU wrote the pages the tracker saw written since "
                        "the parent, and in-parent entries for the rest",
                    phases=clock.phases, dirty_pages=dirty, vma_flags=flags.describe(list(trackers), early))


def _dump_whole(dump: _Dump, pids: list[int], out: LayerWriter, parent: Path | None,
                trackers: dict[int, Backend]) -> Manifest:
    """CRIU dumps every page; memsnap then drops what the chain already holds."""
    ids = dump.ids(trackers)
    clock = dump.freeze()
    dirty = {ids[pid]: t.collect().dirty for pid, t in trackers.items()}
    clock.mark("collect")
    for t in trackers.values():
        t.close()  # unprotect while frozen: CRIU must see plain page tables
    trackers.clear()
    clock.mark("release")
    criu.dump(dump.root, out.dir, dump.freezer.path, leave_running=True)
    clock.mark("criu dump")
    frozen_for = clock.total()
    rel = out.link_parent(parent)
    pages, described = _delta(out.dir, parent, dirty)
    clock.mark("memory delta")
    return Manifest(kind="final", parent=rel, pids=sorted(pids), backend="criu", pages=pages,
                    bytes=pages * PAGE, described_pages=described, freeze_seconds=round(frozen_for, 6),
                    how="uffd-wp dirty set + criu dump, converted to a delta" if parent
                    else "criu dump (no chain)", phases=clock.phases)


def _memory_seconds(stats: dict[str, int]) -> float:
    """How long CRIU spent on memory (finding, reading and writing pages), from its stats:
    memdump_time, which includes memwrite_time (pages are written chunk by chunk within it)."""
    return stats.get("memdump_time", 0) / 1e6


def _written_in(directory: Path, tracked: dict[int, PageRanges]) -> int:
    """Pages CRIU wrote inside tracked memory."""
    return sum(PageRanges(cf.read_pagemap(directory / f"pagemap-{pid}.img").pages(cf.PE_PRESENT))
               .intersection(tracked.get(pid, PageRanges())).pages for pid in cf.pagemap_pids(directory))


class _Phases:
    """Where the freeze time goes."""

    def __init__(self):
        self.began = self.last = time.monotonic()
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round(now - self.last, 6)
        self.last = now

    def split(self, name: str, part: float, first: str, second: str) -> None:
        """Replace phase `name` by `first` and `second`, `part` seconds of it being the latter."""
        whole = self.phases.pop(name)
        part = min(part, whole)
        self.phases[first] = round(whole - part, 6)
        self.phases[second] = round(part, 6)

    def total(self) -> float:
        return self.last - self.began


def _delta(directory: Path, parent: Path | None, dirty: dict[int, PageRanges]) -> tuple[int, int]:
    """Rewrite CRIU's pagemaps in place: unchanged pages the chain holds become in-parent."""
    kept_total = described_total = 0
    for pid in cf.pagemap_pids(directory):
        pagemap = cf.read_pagemap(directory / f"pagemap-{pid}.img")
        present = PageRanges(pagemap.pages(cf.PE_PRESENT))
        in_parent = described_in(parent, pid).intersection(present)
        if pid in dirty:
            in_parent = in_parent.difference(dirty[pid])
        else:
            in_parent = PageRanges()  # not tracked since the last layer: trust nothing in it
        keep = present.difference(in_parent)
        _rewrite_pages(directory, pagemap, keep)
        entries = layer_entries(present, keep)
        cf.write_pagemap(directory / f"pagemap-{pid}.img", cf.Pagemap(pagemap.pages_id, entries))
        kept_total += keep.pages
        described_total += present.pages
    return kept_total, described_total


def _rewrite_pages(directory: Path, pagemap: cf.Pagemap, keep: PageRanges) -> None:
    """Copy only the kept pages' data into a new pages file, in address order."""
    src = cf.pages_path(directory, pagemap.pages_id)
    tmp = src.with_suffix(".delta")
    keep_set = set(keep.addresses())
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        offset = 0
        for vaddr, nr, flags in pagemap.entries:
            if not flags & cf.PE_PRESENT:
                continue
            for i in range(nr):
                if vaddr + i * PAGE in keep_set:
                    fout.write(os.pread(fin.fileno(), PAGE, offset))
                offset += PAGE
    os.replace(tmp, src)
