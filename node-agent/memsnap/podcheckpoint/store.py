"""Where a PodCheckpoint's images live on the node, and keeping them within retention.

    checkpoints/<id>/record.json              the pod, and what recover() must undo (frozen
                                              cgroups, pids whose tracking may be parked)
    checkpoints/<id>/<name>/meta.json         {"name", "time", "size", "layers", "containers", "how"}
    checkpoints/<id>/<name>/<container>/      `runc checkpoint` images (+ memsnap-layer.json), the
                                              parent link naming ../../<previous name>/<container>
                                              or ./<container>.pre (a memsnap layer of all memory)
    checkpoints/<id>/.partial-<name>/         a checkpoint being written (renamed into place)

Everything is root-only (0700 directories, 0600 files): the images hold process memory.
A name is the UTC time it was taken, so names sort oldest first.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from ..images import chain
from ..images.layer import LayerError

ROOT = Path("/var/lib/memsnap/checkpoints")
META = "meta.json"
RECORD = "record.json"
PRE = ".pre"  # suffix of the memsnap layer a container's chain starts from
ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME = re.compile(r"^\d{8}t\d{6}-\d{3}z$")


def root(cid: str) -> Path:
    return ROOT / cid


def new_name(now: float | None = None) -> str:
    now = time.time() if now is None else now
    return time.strftime("%Y%m%dt%H%M%S", time.gmtime(now)) + f"-{int(now * 1000) % 1000:03d}z"


def names(cid: str) -> list[str]:
    """The published checkpoints of cid, oldest first."""
    try:
        return sorted(n for n in os.listdir(root(cid)) if NAME.match(n) and (root(cid) / n / META).is_file())
    except FileNotFoundError:
        return []


def listing(cid: str) -> list[dict]:
    out = []
    for n in names(cid):
        try:
            meta = json.loads((root(cid) / n / META).read_text())
        except (OSError, ValueError):
            continue
        out.append({k: meta[k] for k in ("name", "time", "size", "layers") if k in meta})
    return out


def final_dir(cid: str, name: str, container: str) -> Path:
    return root(cid) / name / container


def containers_of(cid: str, name: str) -> list[str]:
    d = root(cid) / name
    return sorted(c for c in os.listdir(d) if (d / c).is_dir() and not c.startswith(".") and not c.endswith(PRE))


def dir_size(path: Path) -> int:
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(base, f)).st_size for f in files)
    return total


def chain_depth(final: Path) -> int:
    return len(chain.load(final, verify=False))


def write_meta(directory: Path, meta: dict) -> None:
    tmp = directory / f".{META}.tmp"
    tmp.write_text(json.dumps(meta))
    os.chmod(tmp, 0o600)
    os.replace(tmp, directory / META)


def prune(cid: str, keep: int) -> list[str]:
    """Keep the newest `keep` checkpoints, each still restorable: the oldest kept one is
    flattened (its chain merged into one self-contained image) before the older ones go.
    Returns the names removed."""
    all_names = names(cid)
    if keep < 1 or len(all_names) <= keep:
        return []
    dropped, oldest = all_names[:-keep], all_names[-keep]
    base = root(cid) / oldest
    for c in containers_of(cid, oldest):
        _rebase(base / c)
        shutil.rmtree(base / (c + PRE), ignore_errors=True)  # merged into the flattened image
    for n in dropped:
        shutil.rmtree(root(cid) / n)
    for n in all_names[-keep:]:  # chains got shorter: say so in each kept checkpoint's meta
        d = root(cid) / n
        meta = json.loads((d / META).read_text())
        meta.update(layers=max(chain_depth(d / c) for c in containers_of(cid, n)), size=dir_size(d))
        write_meta(d, meta)
    return dropped


def _rebase(final: Path) -> None:
    """final's whole chain into final itself (same name: newer images' parent links stay true)."""
    layers = chain.load(final, verify=False)
    if len(layers) == 1:
        return
    merged = final.with_name(final.name + ".merged")
    shutil.rmtree(merged, ignore_errors=True)
    chain.flatten(final, merged)
    old = final.with_name(final.name + ".old")
    os.rename(final, old)
    os.rename(merged, final)
    shutil.rmtree(old)


def remove(cid: str) -> bool:
    d = root(cid)
    if not d.exists():
        return False
    shutil.rmtree(d)
    return True


def check_id(cid: str) -> None:
    if not ID.match(cid):
        raise LayerError(f"bad checkpoint id {cid!r}: lowercase letters, digits and '-', at most 63")
