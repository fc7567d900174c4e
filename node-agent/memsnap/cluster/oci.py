"""Container images written as docker-archive or OCI-layout tarballs, without a container engine.

A docker-archive is what ``docker save`` writes and what ``ctr images import`` reads: a tar with
``manifest.json`` (Config, RepoTags, Layers), the image config named by its sha256, and one
directory per layer holding ``layer.tar``. An OCI layout tar has ``oci-layout``, ``index.json``
(naming the image for containerd) and ``blobs/sha256/``. Everything is written with fixed owners
and times, so the same inputs give the same image id.
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


def files_layer(entries: dict[str, Entry]) -> bytes:
    """A layer of the given entries (path in the image -> Entry), with fixed owners and times."""
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


def tree_layer(root: Path, skip: tuple[str, ...] = ()) -> bytes:
    """A layer holding the directory tree at root (owners, modes, links kept; times fixed), less
    the top-level paths in skip (e.g. "proc")."""
    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.name.split("/", 1)[0] in skip and "/" in info.name:
            return None  # keep the mount point, drop what is under it
        if info.isdev():
            return None  # a container's /dev comes from its runtime
        info.mtime, info.uname, info.gname = EPOCH, "", ""
        return info
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name, filter=normalize)
    return buf.getvalue()


def _image(tag: str, entries: dict[str, Entry] | list[bytes], entrypoint: list[str] | None,
           cmd: list[str] | None, user: str | None, env: list[str] | None) -> tuple[list[bytes], bytes]:
    """The layer tars (entries as one layer, or layers given bottom first) and the image config."""
    if ":" not in tag.rsplit("/", 1)[-1]:
        raise ValueError(f"image tag {tag!r} has no version (e.g. {tag}:1)")
    layers = entries if isinstance(entries, list) else [files_layer(entries)]
    config: dict = {"Env": env or [DEFAULT_PATH]}
    if entrypoint:
        config["Entrypoint"] = entrypoint
    if cmd:
        config["Cmd"] = cmd
    if user:
        config["User"] = user
    image_config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": CREATED, "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{_sha(layer)}" for layer in layers]},
        "history": [{"created": CREATED, "created_by": "memsnap"} for _ in layers],
    }, sort_keys=True).encode()
    return layers, image_config


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        made: set[str] = set()
        for name, data in files.items():
            _add_parents(tar, name, made)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(data))


def write_docker_archive(path: Path, tag: str, entries: dict[str, Entry] | list[bytes], *, entrypoint: list[str] | None = None,
                         cmd: list[str] | None = None, user: str | None = None,
                         env: list[str] | None = None) -> str:
    """Write an image tagged ``tag`` as a docker-archive (entries: one layer; or the layer tars,
    bottom first); returns its image id (sha256 of the config)."""
    layers, image_config = _image(tag, entries, entrypoint, cmd, user, env)
    image_id = _sha(image_config)
    manifest = json.dumps([{"Config": f"{image_id}.json", "RepoTags": [tag],
                            "Layers": [f"{_sha(layer)}/layer.tar" for layer in layers]}]).encode()
    _write_tar(path, {"manifest.json": manifest, f"{image_id}.json": image_config,
                      **{f"{_sha(layer)}/layer.tar": layer for layer in layers}})
    return image_id


def write_oci_layout(path: Path, tag: str, entries: dict[str, Entry] | list[bytes], *, entrypoint: list[str] | None = None,
                     cmd: list[str] | None = None, user: str | None = None, env: list[str] | None = None) -> str:
    """The same image as an OCI image layout in a tar (index.json names it for containerd); returns its id."""
    layers, image_config = _image(tag, entries, entrypoint, cmd, user, env)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{_sha(image_config)}",
                   "size": len(image_config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{_sha(layer)}",
                    "size": len(layer)} for layer in layers],
    }, sort_keys=True).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{_sha(manifest)}",
        "size": len(manifest), "annotations": {"io.containerd.image.name": tag,
                                               "org.opencontainers.image.ref.name": tag.rsplit(":", 1)[1]}}]}).encode()
    blobs = {f"blobs/sha256/{_sha(b)}": b for b in (*layers, image_config, manifest)}
    _write_tar(path, {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index, **blobs})
    return _sha(image_config)
