"""The memsnap image (the agent and the operator run it), built from the checkout without Docker.

Two layers, so that a change of memsnap's code rebuilds only the small one:

- base: ``debootstrap --variant=minbase trixie`` with ``image/packages.txt``, memsnap's CRIU over
  Debian's binary (as in the node image), and the PyPI packages pinned in ``image/requirements.txt``
  (wheels for the image's python, installed without dependencies into /usr/local);
- memsnap: the checkout's ``memsnap`` and ``memsnap_operator`` packages and a ``memsnap`` command.

Cache (``/var/cache/memsnap/images``, ``$MEMSNAP_IMAGE_CACHE``)::

    base-<hash>/layer.tar   the base layer; <hash>: Debian suite and packages, requirements, CRIU key
    <hash>/memsnap.tar      the image as a docker-archive; <hash>: the base's and memsnap's sources

Builds happen aside and are renamed into place; the two newest other entries of each kind are kept.
"""
from __future__ import annotations

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

from memsnap import __version__
from memsnap.cluster import oci
from memsnap.filelock import locked
from memsnap.nodes import image as node_image

Log = Callable[[str], None]

REPOSITORY = "memsnap.local/memsnap"
TAG = f"{REPOSITORY}:{__version__}"
SUITE = "trixie"
BUILD_FORMAT = 1  # bump when a step below changes in a way the hashed inputs do not show
CACHE_DIR = Path(os.environ.get("MEMSNAP_IMAGE_CACHE", "/var/cache/memsnap/images"))
HERE = Path(__file__).resolve().parent / "image"
PACKAGES_FILE, REQUIREMENTS_FILE = HERE / "packages.txt", HERE / "requirements.txt"
CHECKOUT = Path(__file__).resolve().parents[3]  # node-agent/memsnap/cluster -> the repo
SOURCES = (CHECKOUT / "node-agent" / "memsnap", CHECKOUT / "operator" / "memsnap_operator")
# Mount points and what Debian leaves that an image does not need.
SKIP_TOP = ("proc", "sys", "dev", "run", "tmp")
DROP = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt",
        "var/lib/apt/lists", "var/cache/debconf/templates.dat-old", "var/log")
ENTRYPOINT_SCRIPT = b"#!/usr/bin/python3\nimport sys\nfrom memsnap.cli import main\nsys.exit(main())\n"


class ImageBuildError(RuntimeError):
    """The image could not be built (the message names the step)."""


@dataclass(frozen=True)
class Image:
    tag: str
    archive: Path  # docker-archive
    image_id: str  # sha256 of the image config: changes with any input


def _lines(path: Path) -> list[str]:
    return [s for s in (line.strip() for line in path.read_text().splitlines()) if s and not s.startswith("#")]


def _sha(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def base_digest() -> str:
    return _sha(BUILD_FORMAT, SUITE, _lines(PACKAGES_FILE), _lines(REQUIREMENTS_FILE), node_image.criu_key(),
                SKIP_TOP, DROP)


def _source_files() -> list[tuple[str, Path]]:
    """(path in site-packages, file) for every file of memsnap's packages, in a stable order."""
    files = []
    for src in SOURCES:
        for f in sorted(src.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                files.append((f"{src.name}/{f.relative_to(src).as_posix()}", f))
    return files


def digest() -> str:
    h = hashlib.sha256(f"{base_digest()}\0{TAG}\0".encode())
    h.update(ENTRYPOINT_SCRIPT)
    for rel, f in _source_files():
        h.update(f"\0{rel}\0{f.stat().st_mode & 0o111:o}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cached() -> Image | None:
    path = CACHE_DIR / digest() / "memsnap.tar"
    meta = path.with_name("manifest.json")
    if not (path.is_file() and meta.is_file()):
        return None
    return Image(TAG, path, json.loads(meta.read_text())["image_id"])


def ensure(log: Log | None = None) -> Image:
    """The image archive for the checkout as it is, built first if needed (cold: a few minutes)."""
    image = cached()
    if image:
        os.utime(image.archive.parent)
        return image
    log = log or _stderr
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with locked(CACHE_DIR / ".lock"):  # one build at a time; a waiter then finds it cached
        return cached() or _build(digest(), _ensure_base(log), log)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the base layer ----------------------------------------------------------------------

def _ensure_base(log: Log) -> Path:
    d = base_digest()
    layer = CACHE_DIR / f"base-{d}" / "layer.tar"
    if layer.is_file():
        os.utime(layer.parent)
        return layer
    work = CACHE_DIR / f".base-{d}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    root = work / "root"
    started = time.monotonic()
    log(f"memsnap: building the image's base layer {d} (debootstrap {SUITE}, CRIU, PyPI wheels)")
    try:
        criu = Path(node_image._criu_build())  # cached by its own key
        _debootstrap(root, work / "debootstrap.log")
        node_image._install_criu(root, criu)
        _install_wheels(root, work / "pip.log")
        _trim(root)
        python = _python_version(root)
        (work / "layer.tar").write_bytes(oci.tree_layer(root, skip=SKIP_TOP))
        shutil.rmtree(root)
        (work / "manifest.json").write_text(json.dumps({
            "digest": d, "suite": SUITE, "python": python, "packages": _lines(PACKAGES_FILE),
            "requirements": _lines(REQUIREMENTS_FILE), "criu_build": node_image.criu_key(),
            "build_seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")
        os.rename(work, layer.parent)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)  # keep the logs of a failed build to read
        raise
    log(f"memsnap: image base layer {d} built in {time.monotonic() - started:.0f} s")
    _prune("base-", keep=layer.parent.name)
    return layer


def _debootstrap(root: Path, logfile: Path) -> None:
    if not shutil.which("debootstrap"):
        raise ImageBuildError("debootstrap is not installed (apt-get install debootstrap)")
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(_lines(PACKAGES_FILE))}", SUITE, str(root)]
    for attempt in (1, 2):  # one retry: a mirror hiccup should not fail a CI run
        with open(logfile, "a") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode == 0:
            return
        shutil.rmtree(root, ignore_errors=True)
    raise ImageBuildError(f"debootstrap {SUITE} failed (exit {proc.returncode}); log: {logfile}")


def _python_version(root: Path) -> str:
    found = sorted(p.name for p in (root / "usr/lib").glob("python3.*") if (p / "os.py").is_file())
    if not found:
        raise ImageBuildError(f"no python3 in the image root {root}")
    return found[-1].removeprefix("python")  # "3.13"


def _install_wheels(root: Path, logfile: Path) -> None:
    """The pinned PyPI packages as wheels for the image's python (binary ones for manylinux x86_64)."""
    version = _python_version(root)
    target = root / f"usr/local/lib/python{version}/dist-packages"
    abi = "cp" + version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--only-binary=:all:",
           "--target", str(target), "--python-version", version, "--implementation", "cp", "--abi", abi,
           "--abi", "abi3", "--abi", "none", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any",
           "-r", str(REQUIREMENTS_FILE)]
    with open(logfile, "a") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise ImageBuildError(f"pip install of {REQUIREMENTS_FILE.name} into the image failed; log: {logfile}")
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts pointing at the host's python


def _trim(root: Path) -> None:
    for rel in DROP:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.mkdir()
        elif path.exists():
            path.unlink()
    (root / "etc/hostname").write_text("memsnap\n")


# ---- the image ---------------------------------------------------------------------------

def _code_layer(python: str) -> bytes:
    site = f"usr/local/lib/python{python}/dist-packages"
    entries: dict[str, oci.Entry] = {f"{site}/{rel}": f for rel, f in _source_files()}
    script = CACHE_DIR / ".memsnap-entrypoint"
    script.write_bytes(ENTRYPOINT_SCRIPT)
    script.chmod(0o755)
    entries["usr/local/bin/memsnap"] = script
    return oci.files_layer(entries)


def _build(d: str, base: Path, log: Log) -> Image:
    started = time.monotonic()
    work = CACHE_DIR / f".build-{d}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        python = json.loads((base.parent / "manifest.json").read_text()).get("python", "3.13")
        layers = [base.read_bytes(), _code_layer(python)]
        image_id = oci.write_docker_archive(
            work / "memsnap.tar", TAG, layers, entrypoint=["/usr/local/bin/memsnap"],
            env=[oci.DEFAULT_PATH, "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"])
        (work / "manifest.json").write_text(json.dumps({
            "digest": d, "tag": TAG, "image_id": image_id, "base": base.parent.name,
            "size_bytes": (work / "memsnap.tar").stat().st_size,
            "build_seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")
        os.rename(work, CACHE_DIR / d)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"memsnap: image {TAG} ({d}) written in {time.monotonic() - started:.0f} s")
    _prune("", keep=d)
    return Image(TAG, CACHE_DIR / d / "memsnap.tar", image_id)


def _prune(prefix: str, keep: str, spare: int = 2) -> None:
    """Drop entries of one kind (bases, or images) but `keep` and the `spare` most recently used."""
    kind = [p for p in CACHE_DIR.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != keep
            and p.name.startswith("base-") == (prefix == "base-")]
    kind.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kind[spare:]:
        shutil.rmtree(old, ignore_errors=True)
