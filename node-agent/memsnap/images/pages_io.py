"""Finding a page's data in a chain: the newest layer that holds it, through PE_PARENT links."""
from __future__ import annotations

import bisect
import os
from pathlib import Path

from . import criu_format as cf
from .layer import LayerError

from ..kernel.pagemap import PAGE_SIZE as PAGE


class LayerIndex:
    """One layer's pagemap for one pid, searchable by address."""

    def __init__(self, directory: Path, pid: int):
        path = cf.pagemap_path(directory, pid)
        self.dir = directory
        self.starts: list[int] = []
        self.rows: list[tuple[int, int, int, int]] = []  # (start, end, flags, data offset)
        if not path.exists():
            self.pages_file = None
            return
        pagemap = cf.read_pagemap(path)
        self.pages_file = cf.pages_path(directory, pagemap.pages_id)
        offset = 0
        for vaddr, nr, flags in sorted(pagemap.entries):
            self.starts.append(vaddr)
            self.rows.append((vaddr, vaddr + nr * PAGE, flags, offset))
            if flags & cf.PE_PRESENT:
                offset += nr * PAGE

    def find(self, addr: int) -> tuple[int, int] | None:
        """(flags, byte offset in the pages file) of the entry covering addr, or None."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0:
            return None
        start, end, flags, offset = self.rows[i]
        if addr >= end:
            return None
        return flags, offset + (addr - start)

    def described(self) -> list[tuple[int, int]]:
        return [(s, e) for s, e, f, _ in self.rows if f & (cf.PE_PRESENT | cf.PE_PARENT)]


class PageSource:
    """Reads any page a chain describes for one pid."""

    def __init__(self, chain, pid: int):
        self.pid = pid
        self.layers = [LayerIndex(layer.dir, pid) for layer in chain]
        self._files: dict[Path, object] = {}

    def locate(self, addr: int) -> tuple[Path, int]:
        for depth, layer in enumerate(self.layers):
            hit = layer.find(addr)
            if hit is None:
                raise LayerError(f"page {addr:#x} of pid {self.pid} is missing from {layer.dir}"
                                 + (" (its child says it is there)" if depth else ""))
            flags, offset = hit
            if flags & cf.PE_PRESENT:
                return layer.pages_file, offset
            if not flags & cf.PE_PARENT:
                raise LayerError(f"page {addr:#x} of pid {self.pid} in {layer.dir} is neither present nor in parent")
        raise LayerError(f"page {addr:#x} of pid {self.pid} is marked in-parent in the oldest layer")

    def read(self, addr: int) -> bytes:
        path, offset = self.locate(addr)
        f = self._files.get(path) or self._files.setdefault(path, open(path, "rb"))
        data = os.pread(f.fileno(), PAGE, offset)
        if len(data) != PAGE:
            raise LayerError(f"{path} is truncated at offset {offset}")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def check_references(chain) -> int:
    """Every page the newest layer describes must be found in the chain; returns their count."""
    top = chain[0]
    count = 0
    for pid in cf.pagemap_pids(top.dir):
        source = PageSource(chain, pid)
        for start, end in source.layers[0].described():
            for addr in range(start, end, PAGE):
                path, offset = source.locate(addr)
                if offset + PAGE > os.path.getsize(path):
                    raise LayerError(f"{path} is too short for page {addr:#x} of pid {pid}")
                count += 1
    return count
