"""pytest fixtures and helpers for tests on a real cluster (`memsnap cluster`).

    from memsnap.cluster.testing import cluster, kubectl  # noqa: F401  (fixtures)

``cluster`` brings one two-node cluster up for the whole session (building the binaries first on
a cold cache) and takes it down at the end, unless it was up before. Tests marked ``cluster``
run after all others (tests/conftest.py): bringing the cluster up restarts node-1 and node-2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from memsnap.cluster import build as kbuild
from memsnap.cluster import oci, state
from memsnap.nodes import image as node_image

COUNT = 2
BUSYBOX_IMAGE = "memsnap.local/busybox:1"
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "sleep", "wget", "httpd", "ip", "hostname", "env", "id", "mkdir")


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`memsnap cluster ARGS...` in a subprocess (the code path of the memsnap entry point)."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, "-m", "memsnap.commands.cluster", *args], **kwargs)


def busybox_archive(path: Path) -> Path:
    """A docker-archive of Debian's static busybox (from the node image), tagged BUSYBOX_IMAGE."""
    root = node_image.ensure().root
    busybox = next(p for p in (root / "usr/bin/busybox", root / "bin/busybox") if p.is_file())
    entries: dict[str, oci.Entry] = {"bin/busybox": busybox, "tmp": ("dir", 0o1777)}
    entries.update({f"bin/{a}": ("symlink", "busybox") for a in BUSYBOX_APPLETS})
    oci.write_docker_archive(path, BUSYBOX_IMAGE, entries, cmd=["/bin/sh"], env=["PATH=/bin"])
    return path


@dataclass(frozen=True)
class Kubectl:
    """kubectl 1.20 (from the build) with the cluster's admin kubeconfig."""

    binary: str
    kubeconfig: str

    def __call__(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        proc = subprocess.run([self.binary, f"--kubeconfig={self.kubeconfig}", *args], **kwargs)
        if check and proc.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "-o", "json").stdout)

    def apply(self, manifest: dict) -> None:
        self("apply", "-f", "-", input=json.dumps(manifest))

    def wait_for(self, predicate, what: str, timeout: float = 120.0):
        """Poll predicate() until it returns something truthy (no assertion on how long it took)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}")
            time.sleep(0.5)

    def pod_running(self, name: str, namespace: str = "default", timeout: float = 120.0) -> dict:
        def running():
            pod = self.json("get", "pod", name, "-n", namespace)
            return pod if pod["status"].get("phase") == "Running" else None
        return self.wait_for(running, f"pod {namespace}/{name} to run", timeout)


def pod(name: str, node: str, command: list[str], image: str = BUSYBOX_IMAGE, **spec) -> dict:
    """A one-container pod pinned to node, with a local image (never pulled)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, **spec,
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                     "command": command}]}}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[state.State]:
    """A Ready two-node cluster with the busybox test image loaded, for the whole session."""
    if os.geteuid() != 0:
        pytest.skip("the cluster needs root")
    was_up = state.load() is not None
    proc = run_cli("up", "--nodes", str(COUNT), timeout=3600)
    assert proc.returncode == 0, f"memsnap cluster up failed:\n{proc.stderr}"
    archive = busybox_archive(tmp_path_factory.mktemp("images") / "busybox.tar")
    proc = run_cli("load", str(archive), timeout=300)
    assert proc.returncode == 0, f"memsnap cluster load failed:\n{proc.stderr}"
    yield state.load()
    if not was_up:
        proc = run_cli("down", timeout=300)
        assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def kubectl(cluster) -> Kubectl:
    return Kubectl(str(kbuild.ensure().bin("kubectl")), str(state.ADMIN_KUBECONFIG))
