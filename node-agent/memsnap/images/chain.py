"""A chain of layers, newest first: verify it, find pages in it, flatten and prune it."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..kernel.pagemap import PAGE_SIZE
from .layer import LayerError, LayerWriter, Manifest, read_manifest, verify_files


@dataclass
class Layer:
    dir: Path
    manifest: Manifest

    @property
    def parent_dir(self) -> Path | None:
        link = self.dir / "parent"
        if self.manifest.parent is None:
            return None
        if not link.is_symlink():
            raise LayerError(f"{self.dir}: the manifest names parent {self.manifest.parent} "
                             "but the parent link is missing")
        return (self.dir / "parent").resolve()


def load(newest: Path, verify: bool = True) -> list[Layer]:
    """The chain ending at `newest`, newest first; checks every link and (with verify) every
    file's checksum, and names the first broken thing it finds."""
    chain: list[Layer] = []
    seen: set[Path] = set()
    current: Path | None = newest.resolve()
    while current is not None:
        if current in seen:
            raise LayerError(f"the chain loops back to {current}")
        seen.add(current)
        if not current.is_dir():
            what = f"parent of {chain[-1].dir}" if chain else "layer"
            raise LayerError(f"{what} {current} does not exist")
        layer = Layer(current, read_manifest(current))
        if verify:
            verify_files(current, layer.manifest)
        chain.append(layer)
        current = layer.parent_dir
    if chain[-1].manifest.kind not in ("full", "final") or chain[-1].manifest.parent is not None:
        raise LayerError(f"{chain[-1].dir} is the oldest layer but not a full one")
    return chain


def size(chain: list[Layer]) -> int:
    return sum(info["size"] for layer in chain for info in layer.manifest.files.values())


def flatten(newest: Path, target: Path) -> Path:
    """Write one self-contained layer at `target` equal to the whole chain ending at `newest`."""
    from . import criu_format as cf
    chain = load(newest)
    top = chain[0]
    with LayerWriter(target) as out:
        for name in top.manifest.files:
            if not cf.PAGEMAP_RE.match(name) and not name.startswith("pages-"):
                shutil.copy2(top.dir / name, out.path(name))
        pages = described = 0
        for pid in cf.pagemap_pids(top.dir):
            pages_id, count = _flatten_pid(chain, pid, out)
            pages += count
            described += count
        manifest = Manifest(kind=top.manifest.kind if top.manifest.kind == "final" else "full",
                            parent=None, pids=top.manifest.pids, backend=top.manifest.backend,
                            pages=pages, bytes=pages * PAGE_SIZE, described_pages=described,
                            freeze_seconds=top.manifest.freeze_seconds)
        return out.commit(manifest)


def _flatten_pid(chain: list[Layer], pid: int, out: LayerWriter) -> tuple[int, int]:
    from . import criu_format as cf
    from .pages_io import PageSource
    source = PageSource(chain, pid)
    top_map = cf.read_pagemap(cf.pagemap_path(chain[0].dir, pid))
    page = PAGE_SIZE
    entries = []
    with open(cf.pages_path(out.dir, top_map.pages_id), "wb") as data:
        count = 0
        for vaddr, nr, flags in top_map.entries:
            if not flags & (cf.PE_PRESENT | cf.PE_PARENT):
                continue
            for i in range(nr):
                data.write(source.read(vaddr + i * page))
            entries.append((vaddr, nr, cf.PE_PRESENT))
            count += nr
    cf.write_pagemap(cf.pagemap_path(out.dir, pid), cf.Pagemap(top_map.pages_id, entries))
    return top_map.pages_id, count


def prune(newest: Path, keep: int | None = None, max_bytes: int | None = None) -> list[Path]:
    """Keep the chain ending at `newest` within `keep` layers and `max_bytes`: the oldest
    layers are merged into one full layer (flattened) so the chain stays restorable.
    Returns the directories removed."""
    chain = load(newest)
    cut = len(chain)
    if keep is not None:
        cut = min(cut, max(1, keep))
    while max_bytes is not None and cut > 1 and size(chain[:cut]) > max_bytes:
        cut -= 1
    if cut >= len(chain):
        return []
    base = chain[cut - 1]  # becomes the new oldest layer: flatten everything below into it
    merged = base.dir.with_name(base.dir.name + ".merged")
    flatten(base.dir, merged)
    old = [layer.dir for layer in chain[cut - 1:]]
    staging = base.dir.with_name(base.dir.name + ".old")
    base.dir.rename(staging)
    merged.rename(base.dir)
    shutil.rmtree(staging)
    for layer_dir in old[1:]:
        shutil.rmtree(layer_dir)
    # The merged layer (a full one, no parent) keeps the name its child's parent link names.
    return old[1:]
