"""The final layer: freeze, take the last dirty set, let CRIU dump, keep only what changed.

CRIU dumps every page; memsnap turns that into a delta against the chain: a page the chain
already holds and that was not written since the last layer becomes in-parent. The workload
stands still from the freeze to the end of the dump; if anything fails it is thawed and runs on.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .. import procfs
from ..images import chain
from ..images import criu_format as cf
from ..images.layer import LayerWriter, Manifest
from ..images.pages_io import PAGE
from ..tracking import VmaSelection, registry
from ..tracking.pages import PageRanges
from . import criu
from .freezer import own_cgroup
from .layers import described_in
from .layers import entries as layer_entries


def write(root: int, target: Path, parent: Path | None, selection: VmaSelection = VmaSelection(),
          leave_running: bool = False, on_freeze=None) -> Path:
    """With leave_running the tree stays frozen (in own_cgroup(root)) after a successful dump,
    for the caller to end or thaw (a migration ends it once the target runs it); otherwise
    CRIU stops it. on_freeze() is called the moment the tree is frozen (where a pause starts)."""
    if parent is not None:
        chain.load(parent)
    pids = [root] + procfs.descendants(root)
    trackers = {pid: registry.resume(pid, selection) for pid in pids if registry.parked_backend(pid)}
    freezer = own_cgroup(root)
    try:
        with LayerWriter(target) as out:
            for t in trackers.values():
                t.drop_target_fd()  # CRIU cannot dump a userfaultfd; our duplicate keeps tracking
            clock = _Phases()
            freezer.freeze()
            if on_freeze is not None:
                on_freeze()
            clock.mark("freeze")
            ids = procfs.image_ids(root, sorted(trackers))  # CRIU's names for the tasks
            dirty = {ids[pid]: t.collect().dirty for pid, t in trackers.items()}
            clock.mark("collect")
            for t in trackers.values():
                t.close()  # unprotect while frozen: CRIU must see plain page tables
            trackers = {}
            clock.mark("release")
            criu.dump(root, out.dir, freezer.path, leave_running=leave_running)
            clock.mark("criu dump")
            frozen_for = clock.total()
            rel = out.link_parent(parent)
            pages, described = _delta(out.dir, parent, dirty)
            clock.mark("memory delta")
            manifest = Manifest(kind="final", parent=rel, pids=sorted(pids),
                                backend="criu", pages=pages, bytes=pages * PAGE,
                                described_pages=described, freeze_seconds=round(frozen_for, 6),
                                how="uffd-wp dirty set + criu dump, converted to a delta" if parent
                                else "criu dump (no chain)", phases=clock.phases)
            layer = out.commit(manifest)
        if not leave_running:
            freezer.remove()
        return layer
    except BaseException:
        for t in trackers.values():
            t.close()
        if procfs.alive(root):
            freezer.thaw()
        raise


class _Phases:
    """Where the freeze time goes."""

    def __init__(self):
        self.began = self.last = time.monotonic()
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round(now - self.last, 6)
        self.last = now

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
