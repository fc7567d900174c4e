"""Pre-copy layers: written while the target runs, from the tracker's dirty sets.

The first layer holds every page with data; each later one only the pages written since the
layer before, and marks the rest in-parent. Between runs the targets stay armed (parked), so
separate `memsnap checkpoint` invocations continue one chain.
"""
from __future__ import annotations

import time
from typing import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import procfs
from ..images import chain
from ..images import criu_format as cf
from ..images.layer import LayerWriter, Manifest
from ..tracking import TrackingError, VmaSelection, registry
from ..tracking.base import Backend
from ..tracking.pages import PageRanges
from ..tracking.vmas import ranges_of
from ..kernel.pagemap import PAGE_SIZE
from .layers import described_in, write_process


@dataclass
class Armed:
    """A target's tracker and what it reported for this layer."""

    tracker: Backend
    present: PageRanges  # pages whose data goes into this layer


def arm_tree(root: int, parent: Path | None, backend: str, selection: VmaSelection) -> dict[int, Armed]:
    """Resume (or start) tracking of root and its descendants and collect their changes.

    Without a parent (a new chain), every target starts afresh: its whole memory goes in.
    """
    armed: dict[int, Armed] = {}
    try:
        for pid in [root] + procfs.descendants(root):
            started = procfs.starttime_or_none(pid)
            if started is None:
                continue  # exited since it was listed
            try:
                armed[pid] = _arm_one(pid, parent, backend, selection)
            except (TrackingError, OSError):
                if pid == root or procfs.alive(pid, started):
                    raise
                # a short-lived child (a shell's) exited while being armed: nothing to track
    except BaseException:
        release(armed)
        raise
    return armed


def _arm_one(pid: int, parent: Path | None, backend: str, selection: VmaSelection) -> Armed:
    if registry.parked_backend(pid):
        tracker = registry.resume(pid, selection)
        if parent is not None:
            return Armed(tracker, tracker.collect().dirty)
        tracker.close()  # a new chain: start over with everything
    tracker, baseline, _ = registry.arm(pid, backend, selection)
    return Armed(tracker, baseline)


def release(armed: dict[int, Armed]) -> None:
    for a in armed.values():
        a.tracker.close()


def _drop_exited(armed: dict[int, Armed], pids: list[int]) -> None:
    """Forget targets that exited after being armed (a shell's children come and go)."""
    for pid in pids:
        a = armed.pop(pid)
        if procfs.alive(pid, a.tracker.starttime):
            raise TrackingError(f"pid {pid} runs but its /proc could not be read")
        a.tracker.close()


def park(armed: dict[int, Armed], unsaved: bool) -> None:
    """Leave every target armed for the next layer; with unsaved, what this layer collected
    is handed over so the next layer saves it (nothing is lost when a write failed)."""
    for pid, a in armed.items():
        if procfs.alive(pid, a.tracker.starttime):
            a.tracker.park(a.present if unsaved else PageRanges())
        else:
            a.tracker.close()  # it exited: nothing to keep armed


def write(root: int, target: Path, parent: Path | None, backend: str = "auto",
          selection: VmaSelection = VmaSelection(), verify_parent: bool = True,
          on_collect: Callable[[], None] | None = None, durable: bool = True) -> Path:
    """verify_parent=False checks the chain's links but not its checksums: for a chain the
    caller wrote itself moments ago (a migration's, every round), where hashing it all again
    costs seconds per round at a few GiB, and every page written meanwhile is sent again.
    on_collect() is called once the dirty set is taken: what is written after goes in the next."""
    if parent is not None:
        chain.load(parent, verify=verify_parent)  # refuse to build on a broken chain
    began = time.monotonic()
    armed = arm_tree(root, parent, backend, selection)
    if on_collect is not None:
        on_collect()
    try:
        with LayerWriter(target, durable) as out:
            rel = out.link_parent(parent)
            cf.write_inventory(out.dir)  # lets CRIU take this layer as the parent of a final dump
            ids = procfs.image_ids(root, sorted(armed))  # CRIU names a task by its pid in root's namespace
            _drop_exited(armed, [pid for pid in armed if pid not in ids])
            pages = 0
            for i, (pid, a) in enumerate(sorted(armed.items())):
                try:
                    pages += write_process(out.dir, pid, ids[pid], i + 1, parent, a.present,
                                           ranges_of(a.tracker.tracked))
                except (TrackingError, OSError):
                    if pid == root or procfs.alive(pid, a.tracker.starttime):
                        raise
                    # exited while its pages were copied: this layer does not name it
                    cf.pagemap_path(out.dir, ids[pid]).unlink(missing_ok=True)
                    cf.pages_path(out.dir, i + 1).unlink(missing_ok=True)
                    _drop_exited(armed, [pid])
            described = sum(described_in(out.dir, ids[pid]).pages for pid in armed)
            manifest = Manifest(kind="incremental" if parent else "full", parent=rel,
                                pids=sorted(armed), backend=_backend_of(armed), pages=pages,
                                bytes=pages * PAGE_SIZE, described_pages=described,
                                seconds=round(time.monotonic() - began, 6))
            layer = out.commit(manifest)
    except BaseException:
        park(armed, unsaved=True)
        raise
    park(armed, unsaved=False)
    return layer


def _backend_of(armed: dict[int, Armed]) -> str:
    names = sorted({a.tracker.name for a in armed.values()})
    if not names:
        raise TrackingError("nothing to checkpoint")
    return ",".join(names)
