"""Layers written by CRIU's own memory tracking (soft-dirty kernels), wrapped in memsnap
manifests so that the rest (verify, restore, prune) treats them like any other layer."""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..images import chain
from ..images.criu_format import PE_PARENT, PE_PRESENT, pagemap_pids, pagemap_path, read_pagemap
from ..images.layer import LayerWriter, Manifest
from ..images.pages_io import PAGE
from . import criu
from .freezer import own_cgroup


def write(root: int, target: Path, parent: Path | None, final: bool) -> Path:
    if parent is not None:
        chain.load(parent)
    began = time.monotonic()
    with LayerWriter(target) as out:
        rel = os.path.relpath(parent.absolute(), target.absolute()) if parent else None
        freeze_seconds = None
        if final:
            freezer = own_cgroup(root)
            try:
                criu.dump_incremental(root, out.dir, rel, freezer.path)
            except BaseException:
                freezer.thaw()
                raise
            freeze_seconds = round(time.monotonic() - began, 6)
        else:
            criu.pre_dump(root, out.dir, rel)
        pages, described = _count(out.dir)
        manifest = Manifest(kind="final" if final else ("incremental" if parent else "full"),
                            parent=rel, pids=pagemap_pids(out.dir), backend="criu-soft-dirty",
                            pages=pages, bytes=pages * PAGE, described_pages=described,
                            freeze_seconds=freeze_seconds, seconds=round(time.monotonic() - began, 6),
                            how="criu --track-mem --prev-images-dir")
        return out.commit(manifest)


def _count(directory: Path) -> tuple[int, int]:
    held = described = 0
    for pid in pagemap_pids(directory):
        for _, nr, flags in read_pagemap(pagemap_path(directory, pid)).entries:
            held += nr if flags & PE_PRESENT else 0
            described += nr if flags & (PE_PRESENT | PE_PARENT) else 0
    return held, described
