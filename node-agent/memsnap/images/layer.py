"""One layer of a checkpoint chain: a CRIU image directory plus memsnap's manifest.

A layer is written aside (DIR.partial-*), every file fsynced, then renamed into place, so a
crash or a full disk leaves the chain as it was. Directories are root-only: they hold
process memory.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "memsnap-layer.json"
FORMAT = "memsnap-layer/1"


class LayerError(Exception):
    """A layer or chain is broken, or cannot be written; the message says what and where."""


@dataclass
class Manifest:
    kind: str  # "full", "incremental" or "final"
    parent: str | None  # the parent layer, relative to this one (e.g. "../l1")
    pids: list[int]
    backend: str  # what found the changed pages: uffd-wp, soft-dirty, tracepoint, criu
    pages: int  # pages whose data this layer holds
    bytes: int
    described_pages: int  # pages the layer's pagemaps describe (here or in a parent)
    created: float = field(default_factory=time.time)
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"sha256", "size"}
    freeze_seconds: float | None = None  # final layers: how long the workload stood still
    seconds: float | None = None  # how long writing the layer took
    how: str = ""  # final layers: how the delta was made
    phases: dict[str, float] = field(default_factory=dict)  # final layers: seconds per step
    dirty_pages: dict[str, int] = field(default_factory=dict)  # final layers: written pages, as the tracker and CRIU saw them
    vma_flags: str = ""  # final layers by CRIU: where CRIU took VMA flags from (checkpoint/vmflags.py)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LayerError(f"{directory} is not a memsnap layer (no {MANIFEST})") from None
    except ValueError as exc:
        raise LayerError(f"{path} is not valid JSON: {exc}") from None
    if data.get("format") != FORMAT:
        raise LayerError(f"{path}: unknown format {data.get('format')!r}")
    try:
        return Manifest(**data)
    except TypeError as exc:
        raise LayerError(f"{path}: {exc}") from None


def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "size": path.stat().st_size}


def verify_files(directory: Path, manifest: Manifest) -> None:
    for name, want in sorted(manifest.files.items()):
        path = directory / name
        if not path.exists():
            raise LayerError(f"{path} is missing")
        got = file_digest(path)
        if got != want:
            raise LayerError(f"{path} is corrupt: sha256 {got['sha256'][:12]}…, "
                             f"size {got['size']}; the manifest says {want['sha256'][:12]}…, {want['size']}")


class LayerWriter:
    """Builds a layer in a private directory beside its final place; commit() publishes it."""

    def __init__(self, target: Path, durable: bool = True):
        """durable=False skips the fsyncs (the rename still publishes a whole layer or none):
        for layers that live only as long as a migration, which a crash ends anyway."""
        self.target = target.absolute()
        self.durable = durable
        if self.target.exists():
            raise LayerError(f"{self.target} already exists: a layer is never overwritten")
        self.target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o700)

    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LayerError(f"no space left writing {self.target}; the chain is as it was") from exc

    def path(self, name: str) -> Path:
        return self.dir / name

    def link_parent(self, parent: Path | None) -> str | None:
        """CRIU finds a layer's parent through a symlink named `parent`."""
        if parent is None:
            return None
        rel = os.path.relpath(parent.absolute(), self.target)  # relative to the layer, as CRIU reads it
        os.symlink(rel, self.dir / "parent")
        return rel

    def commit(self, manifest: Manifest) -> Path:
        for name in sorted(os.listdir(self.dir)):
            path = self.dir / name
            if path.is_file() and not path.is_symlink():
                os.chmod(path, 0o600)
                manifest.files[name] = file_digest(path)
                self._sync(path)
        manifest_path = self.dir / MANIFEST
        manifest_path.write_text(manifest.to_json())
        os.chmod(manifest_path, 0o600)
        self._sync(manifest_path)
        self._sync(self.dir)
        os.rename(self.dir, self.target)
        self._sync(self.target.parent)
        return self.target

    def _sync(self, path: Path) -> None:
        if self.durable:
            _fsync(path)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
