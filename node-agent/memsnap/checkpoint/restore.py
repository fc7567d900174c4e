"""Restoring a chain: check it whole first, then let CRIU read it."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .. import procfs
from ..images import chain
from ..images.layer import LayerError
from ..images.pages_io import check_references
from . import criu
from .freezer import own_cgroup


def verify(newest: Path) -> list[chain.Layer]:
    layers = chain.load(newest)
    if layers[0].manifest.kind != "final":
        raise LayerError(f"{newest} is a pre-copy layer: restore needs a final one "
                         "(memsnap checkpoint --final)")
    check_references(layers)
    return layers


def restore(newest: Path) -> dict:
    layers = verify(newest)
    with tempfile.TemporaryDirectory(prefix="memsnap-restore-") as work:
        pidfile = Path(work) / "pid"
        criu.restore(layers[0].dir, pidfile, Path(work))
        pid = int(pidfile.read_text())
    # CRIU puts a tree dumped from a frozen cgroup back frozen: let it run.
    if procfs.alive(pid):
        freezer = own_cgroup(pid)
        if freezer.frozen():
            freezer.thaw()
    return {"pid": pid, "layers": len(layers), "dir": str(layers[0].dir),
            "pages": sum(layer.manifest.pages for layer in layers)}
