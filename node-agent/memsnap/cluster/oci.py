"""Single-layer container images written as docker-archive tarballs, without a container engine.

A docker-archive is what ``docker save`` writes and what ``ctr images import`` reads: a tar with
``manifest.json`` (Config, RepoTags, Layers), the image config named by its sha256, and one
directory per layer holding ``layer.tar``. Everything is written with fixed owners and times, so
the same inputs give the same image id.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

EPOCH = 1609459200  # 2021-01-01: fixed mtime, reproducible ids
CREATED = "2021-01-01T00:00:00Z"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# An entry of the layer: a file on the host to copy, or ("symlink", target), or ("dir", mode).
Entry = Path | tuple[str, str] | tuple[str, int]


def _layer(entries: dict[str, Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        made: set[str] = set()
        for name in sorted(entries):
            _add_parents(tar, name, made)
            entry = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = EPOCH
            if isinstance(entry, Path):
                data = entry.read_bytes()
                info.size, info.mode = len(data), entry.stat().st_mode & 0o7777
                tar.addfile(info, io.BytesIO(data))
            elif entry[0] == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, str(entry[1]), 0o777
                tar.addfile(info)
            else:
                info.type, info.mode = tarfile.DIRTYPE, int(entry[1])
                made.add(name)
                tar.addfile(info)
    return buf.getvalue()


def _add_parents(tar: tarfile.TarFile, name: str, made: set[str]) -> None:
    parts = name.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d not in made:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(info)
            made.add(d)


def write_docker_archive(path: Path, tag: str, entries: dict[str, Entry], *, entrypoint: list[str] | None = None,
                         cmd: list[str] | None = None, user: str | None = None,
                         env: list[str] | None = None) -> str:
    """Write a one-layer image tagged ``tag`` to ``path``; returns its image id (sha256 of the config)."""
    if ":" not in tag.rsplit("/", 1)[-1]:
        raise ValueError(f"image tag {tag!r} has no version (e.g. {tag}:1)")
    layer = _layer(entries)
    diff_id = hashlib.sha256(layer).hexdigest()
    config: dict = {"Env": env or [DEFAULT_PATH]}
    if entrypoint:
        config["Entrypoint"] = entrypoint
    if cmd:
        config["Cmd"] = cmd
    if user:
        config["User"] = user
    image_config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": CREATED, "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": CREATED, "created_by": "memsnap"}],
    }, sort_keys=True).encode()
    image_id = hashlib.sha256(image_config).hexdigest()
    manifest = json.dumps([{"Config": f"{image_id}.json", "RepoTags": [tag],
                            "Layers": [f"{diff_id}/layer.tar"]}]).encode()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("manifest.json", manifest), (f"{image_id}.json", image_config),
                           (f"{diff_id}/layer.tar", layer)):
            if "/" in name:
                d = tarfile.TarInfo(name.split("/")[0])
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, EPOCH
                tar.addfile(d)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(data))
    return image_id
