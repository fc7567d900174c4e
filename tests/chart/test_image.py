"""The memsnap image as built by `memsnap cluster images`: what a user would check before
loading it: its name and layers, and that memsnap, its libraries and memsnap's CRIU run in it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

from memsnap.cluster import images

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="building the image needs root")]


@pytest.fixture(scope="module")
def image() -> images.Image:
    proc = subprocess.run([sys.executable, "-m", "memsnap.cli", "cluster", "images"], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr
    archive, tag = proc.stdout.strip().split("\t")
    found = images.cached()
    assert found and str(found.archive) == archive and found.tag == tag == images.TAG
    return found


@pytest.fixture(scope="module")
def root(image, tmp_path_factory) -> Iterator[Path]:
    """The image's file system, its layers unpacked in order (~220 MB: removed afterwards)."""
    out = tmp_path_factory.mktemp("image-root")
    try:
        with tarfile.open(image.archive) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))[0]
            for layer in manifest["Layers"]:
                with tarfile.open(fileobj=tar.extractfile(layer)) as inner:
                    inner.extractall(out, filter="tar")
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def in_image(root: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})


def test_the_archive_names_the_image_and_runs_memsnap(image):
    with tarfile.open(image.archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        config = json.load(tar.extractfile(manifest[0]["Config"]))
    assert manifest[0]["RepoTags"] == [images.TAG] and len(manifest[0]["Layers"]) == 2
    assert config["config"]["Entrypoint"] == ["/usr/local/bin/memsnap"]
    assert manifest[0]["Config"] == f"{image.image_id}.json"  # the id cluster up rolls pods by


def test_memsnap_its_libraries_and_its_criu_run_in_the_image(root):
    imports = in_image(root, "python3", "-c", "import kopf, aiohttp, kubernetes, prometheus_client, cryptography, "
                                              "pycriu, memsnap.agent.server, memsnap.migration.api, memsnap_operator")
    assert imports.returncode == 0, imports.stderr
    assert in_image(root, "memsnap", "agent", "--help").returncode == 0
    criu = in_image(root, "criu", "--help")
    assert "--track-mem-uffd" in criu.stdout + criu.stderr  # memsnap's patched build, not Debian's
    assert in_image(root, "nsenter", "--version").returncode == 0
    assert in_image(root, "iptables", "--version").returncode == 0  # CRIU's network lock
