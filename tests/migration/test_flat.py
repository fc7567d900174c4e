"""The target's flat image (images/flat.py): pre-copy layers merged as they arrive.

Chains in CRIU's own image format, written by memsnap's layer writer, with pages of known
content: each round writes some pages, maps new memory, drops some, and a process appears.
After every merge, every page the newest layer describes must read the same through the
flat image as through the chain it replaces, and the flat image's pagemaps stay small."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from memsnap.images import criu_format as cf
from memsnap.images.chain import Layer, load
from memsnap.images.flat import FlatChain
from memsnap.images.layer import LayerError, LayerWriter, Manifest, read_manifest
from memsnap.images.pages_io import PageSource
from memsnap.checkpoint.layers import entries
from memsnap.tracking.pages import PageRanges

PAGE = 4096
BASE = 0x7F0000000000


def page_data(addr: int, version: int) -> bytes:
    return (addr.to_bytes(8, "little") + version.to_bytes(4, "little")) * (PAGE // 12) + bytes(PAGE % 12)


class Chain:
    """Writes layers as memsnap's pre-copy does: each describes every page the chain holds."""

    def __init__(self, root: Path):
        self.root, self.layers = root, []
        self.memory: dict[int, dict[int, int]] = {}  # pid -> page address -> version

    def layer(self, written: dict[int, set[int]], dropped: dict[int, set[int]] | None = None) -> Path:
        parent = self.layers[-1] if self.layers else None
        for pid, pages in (dropped or {}).items():
            for addr in pages:
                self.memory[pid].pop(addr, None)
        version = len(self.layers) + 1
        with LayerWriter(self.root / f"l{len(self.layers)}", durable=False) as out:
            rel = out.link_parent(parent)
            for i, pid in enumerate(sorted(set(self.memory) | set(written))):
                mem = self.memory.setdefault(pid, {})
                present = written.get(pid, set())
                for addr in present:
                    mem[addr] = version
                described = PageRanges((a, a + PAGE) for a in mem)
                fresh = PageRanges((a, a + PAGE) for a in present)
                cf.write_pagemap(cf.pagemap_path(out.dir, pid),
                                 cf.Pagemap(i + 1, entries(described.difference(fresh) if parent else PageRanges(), fresh)))
                with open(cf.pages_path(out.dir, i + 1), "wb") as f:
                    for addr in sorted(present):
                        f.write(page_data(addr, version))
            pages = sum(len(p) for p in written.values())
            layer = out.commit(Manifest(kind="incremental" if parent else "full", parent=rel,
                                        pids=sorted(self.memory), backend="test", pages=pages,
                                        bytes=pages * PAGE, described_pages=pages))
        self.layers.append(layer)
        return layer


def run_of(start_page: int, count: int) -> set[int]:
    return {BASE + (start_page + i) * PAGE for i in range(count)}


def check_flat(flat: FlatChain, chain: Chain) -> None:
    top = load(flat.top, verify=True)
    for pid, mem in chain.memory.items():
        source = PageSource(top, pid)
        try:
            for addr, version in mem.items():
                assert source.read(addr) == page_data(addr, version), f"pid {pid} page {addr:#x}"
        finally:
            source.close()


def test_merged_layers_read_as_the_chain_and_stay_small(tmp_path):
    rng = random.Random(7)
    chain, flat = Chain(tmp_path), FlatChain(tmp_path)
    flat.add(chain.layer({1: run_of(0, 4096)}))  # 16 MiB, one run
    check_flat(flat, chain)
    for round_no in range(1, 6):
        written = {1: {BASE + rng.randrange(4096) * PAGE for _ in range(700)}}
        if round_no == 2:  # memory mapped since: below, inside a hole, and above the first run
            written[1] |= run_of(-16, 16) | run_of(5000, 32)
        if round_no == 3:  # a child appears; part of the old memory is given up
            written[2] = run_of(100, 50)
        if round_no == 4:  # runs across two segments' pages, in place
            written[1] |= run_of(-8, 16) | run_of(4090, 6)
        dropped = {1: run_of(2000, 100)} if round_no == 3 else None
        layer = chain.layer(written, dropped)
        flat.add(layer)
        assert not list(layer.glob("pages-*.img")) and not list(layer.glob("pagemap-*.img")), \
            "a merged layer keeps only its manifest"
        check_flat(flat, chain)
    # Rounds with new memory (2, 3) added a segment each; the others wrote in place.
    assert [s.name for s in flat.segments] == ["flat0", "flat1", "flat2"]
    chain_entries = sum(len(cf.read_pagemap(p).entries) for s in flat.segments for p in s.glob("pagemap-*.img"))
    assert chain_entries < 20, f"the flat image's pagemaps hold {chain_entries} entries"


def test_a_final_layer_is_linked_to_the_flat_image(tmp_path):
    chain, flat = Chain(tmp_path), FlatChain(tmp_path)
    flat.add(chain.layer({1: run_of(0, 64)}))
    flat.add(chain.layer({1: run_of(64, 8)}))  # grows: a second segment
    final = chain.layer({1: run_of(3, 2)})  # the final, as CRIU wrote it, on l1
    assert flat.relink(final)
    assert os.readlink(final / "parent") == "../flat1"
    assert read_manifest(final).parent == "../l1"  # the received manifest is left as it came
    layers = load(final, verify=True)
    assert [x.dir.name for x in layers] == ["l2", "flat1", "flat0"]
    check_flat_from(layers, chain)


def check_flat_from(layers: list[Layer], chain: Chain) -> None:
    for pid, mem in chain.memory.items():
        source = PageSource(layers, pid)
        try:
            for addr, version in mem.items():
                assert source.read(addr) == page_data(addr, version)
        finally:
            source.close()


def test_a_layer_whose_parent_was_not_merged_is_refused(tmp_path):
    chain = Chain(tmp_path)
    chain.layer({1: run_of(0, 8)})
    l1 = chain.layer({1: run_of(0, 1)})
    with pytest.raises(LayerError, match="was not merged"):
        FlatChain(tmp_path).add(l1)
