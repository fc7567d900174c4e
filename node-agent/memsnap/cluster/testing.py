"""pytest fixtures and helpers for tests on a real cluster (`memsnap cluster`).

    from memsnap.cluster.testing import cluster, kubectl  # noqa: F401  (fixtures)

``cluster`` brings one two-node cluster up for the whole session (building the binaries first on
a cold cache) and takes it down at the end, unless it was up before. Tests marked ``cluster``
run after all others (tests/conftest.py): bringing the cluster up restarts node-1 and node-2.
With MEMSNAP_TEST_CLUSTER=kind the same tests run on kind instead (skipped, with the reason,
where no Docker engine answers); tests of `memsnap cluster` itself are marked ``local_only``.
"""
from __future__ import annotations

import json
import os
import shutil
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


def busybox_archive(path: Path, tag: str = BUSYBOX_IMAGE, oci_layout: bool = False) -> Path:
    """Debian's static busybox (from the node image) as a docker-archive, or an OCI layout tar."""
    root = node_image.ensure().root
    busybox = next(p for p in (root / "usr/bin/busybox", root / "bin/busybox") if p.is_file())
    entries: dict[str, oci.Entry] = {"bin/busybox": busybox, "tmp": ("dir", 0o1777)}
    entries.update({f"bin/{a}": ("symlink", "busybox") for a in BUSYBOX_APPLETS})
    write = oci.write_oci_layout if oci_layout else oci.write_docker_archive
    write(path, tag, entries, cmd=["/bin/sh"], env=["PATH=/bin"])
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


class LocalCluster:
    """`memsnap cluster` on this machine's local nodes."""

    name = "memsnap"
    nodes = [f"node-{i}" for i in range(1, COUNT + 1)]

    def __init__(self) -> None:
        self.kubeconfig = str(state.ADMIN_KUBECONFIG)
        self._was_up = False

    def up(self) -> None:
        if os.geteuid() != 0:
            pytest.skip("the cluster needs root")
        self._was_up = state.load() is not None
        # The chart without its operator running: tests/operator run their own (one operator at a
        # time); tests/chart scale the chart's up to check it.
        flags = ["--bare"] if bare_cluster() else ["--no-operator"]
        proc = run_cli("up", "--nodes", str(COUNT), *flags, timeout=3600)
        assert proc.returncode == 0, f"memsnap cluster up failed:\n{proc.stderr}"

    def load(self, archive: Path) -> None:
        proc = run_cli("load", str(archive), timeout=300)
        assert proc.returncode == 0, f"memsnap cluster load failed:\n{proc.stderr}"

    def down(self) -> None:
        if os.geteuid() == 0 and not self._was_up:
            proc = run_cli("down", timeout=300)
            assert proc.returncode == 0, proc.stderr

    def pod_prefix(self, node: str) -> str:
        return state.pod_subnet(self.nodes.index(node) + 1).rsplit(".", 2)[0] + "."


class KindCluster:
    """The same cluster on kind (kind-config.yaml, a node image from the Dockerfile beside it)."""

    name = "memsnap"
    nodes = ["memsnap-worker", "memsnap-worker2"]
    image = "memsnap/kind-node:v1.20"

    def __init__(self, workdir: Path) -> None:
        self.kubeconfig = str(workdir / "kind.kubeconfig")

    def up(self) -> None:
        reason = kind_unavailable()
        if reason:
            pytest.skip(reason)
        repo = KIND_DIR.parents[3]
        if subprocess.run(["docker", "image", "inspect", self.image], capture_output=True).returncode:
            _checked(["docker", "build", "-t", self.image, "-f", str(KIND_DIR / "Dockerfile"), str(repo)])
        _checked(["kind", "create", "cluster", "--config", str(KIND_DIR / "kind-config.yaml"), "--image", self.image,
                  "--kubeconfig", self.kubeconfig, "--wait", "300s"])

    def load(self, archive: Path) -> None:
        _checked(["kind", "load", "image-archive", str(archive), "--name", self.name])

    def down(self) -> None:
        if not kind_unavailable():
            _checked(["kind", "delete", "cluster", "--name", self.name, "--kubeconfig", self.kubeconfig])

    def pod_prefix(self, node: str) -> str:
        return "198.19."  # kind's controller manager hands out the per-node /24s in its own order


KIND_DIR = Path(__file__).resolve().parent / "kind"
BACKEND_ENV = "MEMSNAP_TEST_CLUSTER"  # "local" (default) or "kind"
BARE_ENV = "MEMSNAP_TEST_CLUSTER_BARE"  # "1": the local cluster without memsnap's chart (nodes' own agents)


def bare_cluster() -> bool:
    return os.environ.get(BARE_ENV, "") not in ("", "0")


def kind_unavailable() -> str:
    """Why kind cannot run here, or "" when it can."""
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError:
        return "no Docker engine: the docker command is not installed"
    except subprocess.TimeoutExpired:
        return "no Docker engine answers (docker info timed out)"
    if proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["docker info failed"]
        return f"no Docker engine answers: {lines[-1]}"
    if not shutil.which("kind"):
        return "kind is not installed (https://kind.sigs.k8s.io)"
    return ""


def _checked(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(argv[:3])} failed:\n{proc.stderr[-2000:]}"


def backend_is_local() -> bool:
    return os.environ.get(BACKEND_ENV, "local") == "local"


#: For tests of `memsnap cluster` itself (its CLI, status, faults): skipped on kind.
local_only = pytest.mark.skipif(not backend_is_local(), reason="tests memsnap cluster itself, not kind")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[LocalCluster | KindCluster]:
    """A Ready two-worker cluster with the busybox test image loaded, for the whole session:
    memsnap's own, or kind's when MEMSNAP_TEST_CLUSTER=kind (skipped without a Docker engine)."""
    backend = os.environ.get(BACKEND_ENV, "local")
    if backend not in ("local", "kind"):
        raise pytest.UsageError(f"{BACKEND_ENV} must be local or kind, not {backend!r}")
    c = LocalCluster() if backend == "local" else KindCluster(tmp_path_factory.mktemp("kind"))
    try:
        c.up()
        c.load(busybox_archive(tmp_path_factory.mktemp("images") / "busybox.tar"))
        yield c
    finally:  # also after a failed up: it leaves its remains in place to read
        c.down()


@pytest.fixture(scope="session")
def kubectl(cluster) -> Kubectl:
    """kubectl 1.20 from the build; on kind, the kubectl on PATH if there is one."""
    on_path = shutil.which("kubectl") if isinstance(cluster, KindCluster) else None
    return Kubectl(on_path or str(kbuild.ensure().bin("kubectl")), cluster.kubeconfig)
