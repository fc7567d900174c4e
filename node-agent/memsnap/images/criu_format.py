"""The two CRIU image files memsnap writes itself: pagemap-<pid>.img and pages-<id>.img.

pagemap is a protobuf image (read and written with pycriu, which ships with CRIU): a head
naming the pages file, then entries (vaddr, nr_pages, flags). pages-<id>.img holds the data of
the PE_PRESENT entries back to back; PE_PARENT pages are in the parent directory's images.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..kernel.pagemap import PAGE_SIZE

PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

PAGEMAP_RE = re.compile(r"^pagemap-(\d+)\.img$")


def _pycriu():
    try:
        import pycriu.images
    except ImportError:
        raise RuntimeError("pycriu (CRIU's image library, Debian package python3-pycriu) is "
                           "needed to read and write CRIU images") from None
    return pycriu.images


@dataclass
class Pagemap:
    pages_id: int
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (vaddr, nr_pages, flags)

    def pages(self, flag: int) -> list[tuple[int, int]]:
        """[start, end) address ranges of the entries with `flag`."""
        return [(v, v + n * PAGE_SIZE) for v, n, f in self.entries if f & flag]


def pagemap_path(directory: Path, pid: int) -> Path:
    return directory / f"pagemap-{pid}.img"


def pages_path(directory: Path, pages_id: int) -> Path:
    return directory / f"pages-{pages_id}.img"


def pagemap_pids(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for name in os.listdir(directory) if (m := PAGEMAP_RE.match(name)))


def read_pagemap(path: Path) -> Pagemap:
    with open(path, "rb") as f:
        img = _pycriu().load(f)
    if img["magic"] != "PAGEMAP":
        raise ValueError(f"{path} is a {img['magic']} image, not a pagemap")
    head, *entries = img["entries"]
    return Pagemap(head["pages_id"], [(e["vaddr"], e["nr_pages"], e.get("flags", PE_PRESENT))
                                      for e in entries])


def write_pagemap(path: Path, pagemap: Pagemap) -> None:
    entries = [{"pages_id": pagemap.pages_id}]
    entries += [{"vaddr": v, "nr_pages": n, "flags": f} for v, n, f in pagemap.entries]
    with open(path, "wb") as f:
        _pycriu().dump({"magic": "PAGEMAP", "entries": entries}, f)


IMAGES_VERSION = 2  # CRIU_IMAGES_V1_1, what CRIU 3.x and 4.x write


def write_inventory(directory: Path) -> None:
    """inventory.img with the time of this layer (microseconds since boot, as CRIU counts).

    CRIU reads its parent's dump_uptime to tell a process that lived through the parent dump
    from a new one with the same pid; without it, it ignores the parent and dumps everything.
    """
    with open("/proc/uptime") as f:
        uptime_us = int(float(f.read().split()[0]) * 1_000_000)
    with open(directory / "inventory.img", "wb") as f:
        _pycriu().dump({"magic": "INVENTORY", "entries": [
            {"img_version": IMAGES_VERSION, "fdinfo_per_id": True, "dump_uptime": uptime_us}]}, f)
