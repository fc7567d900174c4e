"""Writing one process's part of a layer: its pagemap and the data of its changed pages."""
from __future__ import annotations

import ctypes
from pathlib import Path

from ..images import criu_format as cf
from ..images.pages_io import PAGE, LayerIndex
from ..kernel import vm
from ..tracking.base import TargetGone
from ..tracking.pages import PageRanges

CHUNK = 32 << 20  # bytes copied from the target per process_vm_readv batch


def described_in(parent: Path | None, pid: int) -> PageRanges:
    """Pages the parent layer describes for pid (held there or further up the chain)."""
    if parent is None:
        return PageRanges()
    return PageRanges(LayerIndex(parent, pid).described())


def entries(described: PageRanges, present: PageRanges) -> list[tuple[int, int, int]]:
    """Pagemap entries: runs of `present` pages (data here) and the rest of `described`
    (data in the parent), in address order."""
    out = []
    for start, end in described.union(present):
        cursor = start
        for p_start, p_end in PageRanges([(start, end)]).intersection(present):
            if p_start > cursor:
                out.append((cursor, (p_start - cursor) // PAGE, cf.PE_PARENT))
            out.append((p_start, (p_end - p_start) // PAGE, cf.PE_PRESENT))
            cursor = p_end
        if cursor < end:
            out.append((cursor, (end - cursor) // PAGE, cf.PE_PARENT))
    return out


def copy_pages(pid: int, pages: PageRanges, out: Path) -> int:
    """Copy the target's pages into `out`, in address order; returns pages copied.

    The target runs meanwhile: a page it rewrites after the tracker's look is reported again by
    the next round. A range unmapped meanwhile reads short and is written as zeros (the final
    layer, taken from CRIU, will not refer to it).
    """
    buf = (ctypes.c_char * CHUNK)()
    with open(out, "wb") as f:
        for batch, size in _batches(pages, CHUNK):
            try:
                got = vm.read_ranges(pid, batch, buf)
            except ProcessLookupError:
                raise TargetGone(f"pid {pid} exited while its pages were being copied; "
                                 "no layer was written and the chain is as it was") from None
            f.write(memoryview(buf)[:got])
            f.write(bytes(size - got))
    return pages.pages


def _batches(pages: PageRanges, most: int):
    """Groups of ranges of at most `most` bytes in all, longer ranges cut to fit."""
    batch, size = [], 0
    for start, end in pages:
        while start < end:
            take = min(end - start, most - size)
            batch.append((start, start + take))
            size += take
            start += take
            if size == most:
                yield batch, size
                batch, size = [], 0
    if batch:
        yield batch, size


def write_process(directory: Path, pid: int, image_id: int, pages_id: int, parent: Path | None,
                  present: PageRanges, keep: PageRanges) -> int:
    """Write pid's pagemap (as pagemap-<image_id>.img, the id CRIU will give it) and pages.

    present: pages whose data goes into this layer; keep: the address ranges still mapped,
    outside of which the parent's pages are dropped. Returns pages written.
    """
    described = described_in(parent, image_id).intersection(keep)
    cf.write_pagemap(cf.pagemap_path(directory, image_id), cf.Pagemap(pages_id, entries(described, present)))
    return copy_pages(pid, present, cf.pages_path(directory, pages_id))
