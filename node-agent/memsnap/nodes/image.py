"""The node image: a Debian 13 root with CRIU and python3, built by debootstrap, cached by input hash.

CRIU is memsnap's own build (node-agent/criu: Debian's source plus a patch series), installed
over Debian's binary with dpkg-divert; Debian's package stays for its libraries, crit and pycriu.

The image lives at ``/var/cache/memsnap/node-image/<hash>/root``; the hash covers everything the
build reads from the repo (suite, package list, files under ``rootfs/``, the CRIU build's key,
BUILD_FORMAT). A build
happens aside in ``.build-<hash>-<pid>`` and is renamed into place, so a published image is
complete and never changes: running nodes use it as their overlayfs lower dir.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

Log = Callable[[str], None]  # where progress messages go (default: stderr)

# Pinned: CRIU >= 4.1 is needed on kernel 6.18 and only trixie has it, whatever the host runs.
SUITE = "trixie"
VARIANT = "minbase"
# Bump when the build steps below change in a way the hashed files do not show.
BUILD_FORMAT = 2

CACHE_DIR = Path("/var/cache/memsnap/node-image")
HERE = Path(__file__).resolve().parent
PACKAGES_FILE = HERE / "packages.txt"
ROOTFS_DIR = HERE / "rootfs"
CRIU_BUILD = HERE.parent.parent / "criu" / "build"
# Mount point of the checkout's node-agent/ inside every node (see rootfs/.../memsnap-checkout.pth).
CHECKOUT_MOUNT = "/opt/memsnap/node-agent"


class ImageError(Exception):
    """The node image could not be built."""


@dataclass(frozen=True)
class Image:
    digest: str
    path: Path  # the directory holding root/ and manifest.json

    @property
    def root(self) -> Path:
        return self.path / "root"


def packages() -> list[str]:
    lines = PACKAGES_FILE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _overlay_files() -> list[Path]:
    return sorted(p for p in ROOTFS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def digest() -> str:
    """Hash of every input of the build: changes exactly when a rebuild is needed."""
    h = hashlib.sha256()
    h.update(json.dumps([BUILD_FORMAT, SUITE, VARIANT, packages(), CHECKOUT_MOUNT, criu_key()]).encode())
    for f in _overlay_files():
        rel = f.relative_to(ROOTFS_DIR).as_posix()
        h.update(f"\0{rel}\0{f.stat().st_mode & 0o7777:o}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def criu_key() -> str:
    """The cache key of memsnap's CRIU build (its script and patches)."""
    return _criu_build("--key")


def _criu_build(*args: str) -> str:
    proc = subprocess.run([str(CRIU_BUILD), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise ImageError(f"node-agent/criu/build {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout.strip()


def cached() -> Image | None:
    """The image for the current inputs, if it is built."""
    d = digest()
    path = CACHE_DIR / d
    return Image(d, path) if (path / "manifest.json").is_file() else None


def ensure(log: Log | None = None) -> Image:
    """Return the image for the current inputs, building it first if needed (~1 min, needs network)."""
    image = cached()
    if image:
        os.utime(image.path)  # prune() spares the most recently used images
        return image
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a waiter then finds it cached
        image = cached()
        if image:
            return image
        _remove_stale_builds()
        return _build(digest(), log or stderr_log)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _remove_stale_builds() -> None:
    for stale in CACHE_DIR.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build(d: str, log: Log) -> Image:
    work = CACHE_DIR / f".build-{d}-{os.getpid()}"
    root = work / "root"
    work.mkdir()
    started = time.monotonic()
    log(f"memsnap: building node image {d} (debootstrap {SUITE}, about a minute)")
    try:
        criu = Path(_criu_build())  # cached by its own key; a few minutes when cold
        _debootstrap(root)
        _customize(root)
        _install_criu(root, criu)
        manifest = {
            "digest": d,
            "suite": SUITE,
            "packages": packages(),
            "versions": _versions(root, ["criu", "python3", "iproute2"]),
            "criu_build": criu_key(),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(work, CACHE_DIR / d)  # atomic publish
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"memsnap: node image {d} built in {manifest['build_seconds']} s")
    return Image(d, CACHE_DIR / d)


def _debootstrap(root: Path) -> None:
    if not shutil.which("debootstrap"):
        raise ImageError("debootstrap is not installed (apt-get install debootstrap)")
    cmd = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(packages())}", SUITE, str(root)]
    for attempt in (1, 2):  # one retry: a mirror hiccup should not fail a CI run
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0:
            return
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        if attempt == 2:
            raise ImageError(f"debootstrap failed (exit {proc.returncode}):\n{tail}")
        shutil.rmtree(root, ignore_errors=True)


def _customize(root: Path) -> None:
    """Add the repo's files, the checkout mount point, and drop what only the build needed."""
    for f in _overlay_files():
        dst = root / f.relative_to(ROOTFS_DIR)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
        os.chmod(dst, f.stat().st_mode & 0o7777)
    (root / CHECKOUT_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("node\n")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / junk).glob("*"):
            if p.is_file():
                p.unlink()


def _install_criu(root: Path, criu: Path) -> None:
    """Put memsnap's CRIU in place of Debian's binary (diverted, so dpkg knows)."""
    subprocess.run(["chroot", str(root), "dpkg-divert", "--quiet", "--local", "--rename",
                    "--divert", "/usr/sbin/criu.debian", "--add", "/usr/sbin/criu"], check=True)
    shutil.copyfile(criu, root / "usr/sbin/criu")
    os.chmod(root / "usr/sbin/criu", 0o755)


def _versions(root: Path, names: list[str]) -> dict[str, str]:
    """Installed versions, read from the image's dpkg status (no chroot needed)."""
    versions: dict[str, str] = {}
    status = (root / "var/lib/dpkg/status").read_text()
    for stanza in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        if fields.get("Package") in names:
            versions[fields["Package"]] = fields.get("Version", "?")
    return versions


def prune(keep: set[str], spare: int = 2) -> list[str]:
    """Remove cached images except those in ``keep`` (digests) and the ``spare`` most recently
    used others (checkouts on different commits share the cache); returns the digests removed."""
    if not CACHE_DIR.is_dir():
        return []
    others = [p for p in CACHE_DIR.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in keep]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for p in others[spare:]:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in others[spare:]]
