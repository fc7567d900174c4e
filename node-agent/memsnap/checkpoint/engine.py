"""Which engine writes a node's layers: memsnap's tracker, or CRIU's own soft-dirty tracking.

CRIU can make incremental dumps itself (`pre-dump --track-mem`, `dump --prev-images-dir`)
where the kernel has soft-dirty; memsnap's tracker works everywhere else (arm64, kernels
without CONFIG_MEM_SOFT_DIRTY). "auto" prefers memsnap's: it needs no freeze per pre-copy
layer (CRIU freezes the tree for every pre-dump).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import criu

ENGINES = ("auto", "memsnap", "criu")


class EngineError(Exception):
    pass


@dataclass(frozen=True)
class Choice:
    engine: str
    why: str


def choose(wanted: str) -> Choice:
    if wanted not in ENGINES:
        raise EngineError(f"unknown engine {wanted!r} (choose from {', '.join(ENGINES)})")
    if wanted == "criu":
        ok, why = criu.has_dirty_tracking()
        if not ok:
            raise EngineError(f"{why}: use --engine memsnap")
        return Choice("criu", why)
    return Choice("memsnap", "memsnap's tracker: exact dirty sets on any kernel, no freeze before the final layer")
