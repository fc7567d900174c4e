"""Restoring a chain: check it whole first, then let CRIU read it."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..images import chain
from ..images.layer import LayerError
from ..images.pages_io import check_references
from . import criu


def verify(newest: Path, thorough: bool = True) -> list[chain.Layer]:
    """The chain ending at newest, which must be a final layer. thorough also checks every
    file's checksum and every in-parent page reference; without it, only the links."""
    layers = chain.load(newest, verify=thorough)
    if layers[0].manifest.kind != "final":
        raise LayerError(f"{newest} is a pre-copy layer: restore needs a final one "
                         "(memsnap checkpoint --final)")
    if thorough:
        check_references(layers)
    return layers


def restore(newest: Path) -> dict:
    layers = verify(newest)
    with tempfile.TemporaryDirectory(prefix="memsnap-restore-") as work:
        pidfile = Path(work) / "pid"
        criu.restore(layers[0].dir, pidfile, Path(work))
        pid = int(pidfile.read_text())
    return {"pid": pid, "layers": len(layers), "dir": str(layers[0].dir),
            "pages": sum(layer.manifest.pages for layer in layers)}
