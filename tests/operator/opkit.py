"""Helpers and fixtures of the operator's tests (imported by name: tests/operator has neither
__init__.py, which would make it a package called `operator` hiding the standard library's, nor a
conftest.py, whose module name `conftest` the other tests import from tests/).

The operator on the session's real cluster: the CRDs applied with kubectl, `memsnap operator` as a
real subprocess (kubeconfig, the agents' mutual TLS as "operator" from the host's CA),
real pods on real kubelets, the real agents in the nodes."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from memsnap.cluster import oci, worker
from memsnap.cluster.testing import BUSYBOX_IMAGE, Kubectl

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "charts" / "memsnap" / "crds"
EXAMPLES = REPO / "examples"
FINAL = ("Succeeded", "Failed", "RolledBack")
RESTORE_FROM = "memsnap.io/restore-from"
# The node side of a pod migration: containerd's 'memsnap' handler runs the runc wrapper that
# restores a target pod's containers (the podengine branch). Without it the flow can be tested
# up to the agent's answer only.
POD_ENGINE = getattr(worker, "RUNTIME_HANDLER", None) == "memsnap"
needs_pod_engine = pytest.mark.skipif(not POD_ENGINE, reason="the nodes have no 'memsnap' runtime handler "
                                      "(the pod migration engine is not in this tree)")

# A workload whose state is in memory: a shell counter; its log shows where it was.
COUNTER = ["sh", "-c", 'i=0; while :; do i=$((i+1)); echo "count=$i"; sleep 0.2; done']
# The pod engine's test workload (one process, no children): a random token, MiB of data derived
# from it and a counter, all in memory; each second it prints them with the longest pause it felt.
COUNTER_SOURCE = REPO / "tests" / "podmigration" / "counter.c"
COUNTER_IMAGE = "memsnap.local/counter:1"
COUNTER_LINE = re.compile(r"^token=(\w+) count=(\d+) sum=(\w+) maxgap_ms=([\d.]+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> Iterator[None]:
    """This tree's CRDs (over the chart's, if it installed them: removed only if they were not there)."""
    existed = kubectl("get", "crd", "podmigrations.memsnap.io", check=False).returncode == 0
    kubectl("apply", "-f", str(CRDS))
    kubectl("wait", "--for=condition=Established", "crd/podmigrations.memsnap.io", "crd/podcheckpoints.memsnap.io",
            "--timeout=60s")
    yield
    if not existed:
        kubectl("delete", "-f", str(CRDS), "--ignore-not-found", "--wait=true", timeout=120)


def chart_operators(kubectl: Kubectl) -> list[tuple[str, str, int]]:
    """(namespace, name, replicas) of the operator Deployments the chart installed."""
    found = kubectl.json("get", "deployments", "--all-namespaces", "-l", "app.kubernetes.io/component=operator")
    return [(d["metadata"]["namespace"], d["metadata"]["name"], d["spec"].get("replicas", 1)) for d in found["items"]]


def scale_chart_operator(kubectl: Kubectl, namespace: str, name: str, replicas: int) -> None:
    """Scale and wait: to 0 until its pods are gone, to 1 until its pod is ready."""
    kubectl("scale", "deployment", name, "-n", namespace, f"--replicas={replicas}")

    def settled() -> bool | None:
        pods = [p for p in kubectl.json("get", "pods", "-n", namespace, "-l",
                                        "app.kubernetes.io/component=operator")["items"]]
        ready = [p for p in pods if not p["metadata"].get("deletionTimestamp")
                 and all(c["ready"] for c in p["status"].get("containerStatuses") or [{"ready": False}])]
        return (len(pods) == 0) if replicas == 0 else (len(ready) == replicas) or None
    kubectl.wait_for(settled, f"the chart's operator {namespace}/{name} at {replicas} replicas", timeout=120)


@pytest.fixture(scope="session")
def no_chart_operator(kubectl: Kubectl) -> Iterator[None]:
    """The tests run their own operator (flags, kill, restart); one installed by the chart would
    act on the same PodMigrations, so it is scaled to 0 meanwhile and back afterwards."""
    scaled = [d for d in chart_operators(kubectl) if d[2]]
    for namespace, name, _ in scaled:
        scale_chart_operator(kubectl, namespace, name, 0)
    yield
    for namespace, name, replicas in scaled:
        kubectl("scale", "deployment", name, "-n", namespace, f"--replicas={replicas}")


@pytest.fixture
def chart_operator(kubectl: Kubectl, crds, runtime_class, no_chart_operator) -> Iterator[Callable[[], str]]:
    """The operator Deployment the chart installed, scaled to one for the test (in-cluster config,
    its client certificate from its init container, the image's code); yields a reader of its log."""
    if not chart_operators(kubectl):
        pytest.skip("the cluster has no operator installed by the chart")
    namespace, name, _ = chart_operators(kubectl)[0]
    scale_chart_operator(kubectl, namespace, name, 1)

    def log() -> str:
        return kubectl("logs", "-n", namespace, f"deployment/{name}", "--tail=200", check=False).stdout
    try:
        yield log
    finally:
        print(f"--- the chart's operator ---\n{log()}")
        scale_chart_operator(kubectl, namespace, name, 0)


@pytest.fixture(scope="session")
def runtime_class(kubectl: Kubectl) -> Iterator[str]:
    """RuntimeClass memsnap (the chart's, when installed). Without the pod engine its handler is
    plain runc: the target pod then starts fresh, enough to drive the flow to the agent's answer."""
    existed = kubectl("get", "runtimeclass", "memsnap", check=False).returncode == 0
    handler = "memsnap" if POD_ENGINE else "runc"
    if not existed:
        kubectl.apply({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "memsnap"},
                       "handler": handler})
    yield handler
    if not existed:
        kubectl("delete", "runtimeclass", "memsnap", "--ignore-not-found")


@pytest.fixture(scope="session")
def counter_image(cluster, tmp_path_factory) -> str:
    """COUNTER_IMAGE built statically from COUNTER_SOURCE and loaded into the nodes."""
    if not COUNTER_SOURCE.exists():
        pytest.skip(f"no {COUNTER_SOURCE.relative_to(REPO)} (the pod engine's workload) in this tree")
    d = tmp_path_factory.mktemp("counter")
    subprocess.run(["gcc", "-O2", "-static", "-o", str(d / "counter"), str(COUNTER_SOURCE)], check=True)
    oci.write_docker_archive(d / "counter.tar", COUNTER_IMAGE, {"counter": d / "counter", "tmp": ("dir", 0o1777)},
                             entrypoint=["/counter"])
    cluster.load(d / "counter.tar")
    return COUNTER_IMAGE


def counter_pod(name: str, node: str, mib: int = 16) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": COUNTER_IMAGE, "imagePullPolicy": "Never",
                                     "args": [str(mib)]}]}}


def counter_lines(kubectl: Kubectl, pod: str) -> list[tuple[str, int, str, float]]:
    """(token, count, checksum, longest pause in ms) for each line the counter printed."""
    out = kubectl("logs", pod, check=False).stdout
    return [(m[1], int(m[2]), m[3], float(m[4])) for m in map(COUNTER_LINE.match, out.splitlines()) if m]


class Operator:
    """`memsnap operator` in a subprocess, its output in a file."""

    def __init__(self, kubeconfig: str, log: Path, *flags: str):
        self.log = log
        self.metrics_port = free_port()
        self._out = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memsnap.cli", "operator", "--kubeconfig", kubeconfig,
             "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--verbose", *flags],
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:  # /metrics answers once the startup handler ran; the watches start next
            if self.proc.poll() is not None:
                raise AssertionError(f"memsnap operator exited {self.proc.returncode}:\n{self.tail()}")
            try:
                self.metrics()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"memsnap operator did not start:\n{self.tail()}") from None
                time.sleep(0.2)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            key, _, value = line.rpartition(" ")
            if key == (f"{name}{{{want}}}" if labels else name):
                return float(value)
        return None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: as if its node died."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


@pytest.fixture
def operator(kubectl: Kubectl, crds, runtime_class, no_chart_operator, tmp_path: Path) -> Iterator[Callable[..., Operator]]:
    """start(*flags) -> a running operator; all stopped at the end (their log printed on failure)."""
    started: list[Operator] = []

    def start(*flags: str) -> Operator:
        op = Operator(kubectl.kubeconfig, tmp_path / f"operator-{len(started)}.log", *flags)
        started.append(op)
        return op
    yield start
    for op in started:
        op.stop()
        print(f"--- {op.log} ---\n{op.tail(200)}")


@pytest.fixture
def resources(kubectl: Kubectl, operator) -> Iterator[Callable[[dict], dict]]:
    """apply(manifest) that deletes what it applied at the end: PodMigrations first, while the
    operator still runs (their finalizer is its), then workloads."""
    applied: list[dict] = []

    def apply(manifest: dict) -> dict:
        kubectl.apply(manifest)
        applied.append(manifest)
        return manifest
    apply.track = applied.append  # for what the test applied itself
    yield apply
    for m in sorted(applied, key=lambda m: m["kind"] != "PodMigration"):
        kubectl("delete", m["kind"].lower(), m["metadata"]["name"], "-n", m["metadata"].get("namespace", "default"),
                "--ignore-not-found", "--wait=true", timeout=180)
    # Target pods a failed test may have left (ours carry the restore-from annotation).
    for pod in kubectl.json("get", "pods", "-n", "default")["items"]:
        if RESTORE_FROM in (pod["metadata"].get("annotations") or {}):
            kubectl("delete", "pod", pod["metadata"]["name"], "--grace-period=0", "--force", "--ignore-not-found",
                    check=False)


def busybox_pod(name: str, node: str, command: list[str] = COUNTER, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, **spec,
                     "containers": [{"name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                                     "command": command}]}}


def podmigration(name: str, pod: str, **spec) -> dict:
    return {"apiVersion": "memsnap.io/v1alpha1", "kind": "PodMigration",
            "metadata": {"name": name, "namespace": "default"}, "spec": {"podName": pod, **spec}}


def get(kubectl: Kubectl, kind: str, name: str) -> dict | None:
    proc = kubectl("get", kind, name, "-n", "default", "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def wait_phase(kubectl: Kubectl, name: str, phases=FINAL, timeout: float = 180) -> dict:
    def reached():
        pmig = get(kubectl, "podmigration", name)
        return pmig if pmig and (pmig.get("status") or {}).get("phase") in phases else None
    try:
        return kubectl.wait_for(reached, f"PodMigration {name} in {'/'.join(phases)}", timeout)
    except AssertionError:
        raise AssertionError(f"PodMigration {name} never reached {phases}: {get(kubectl, 'podmigration', name)}")


def events(kubectl: Kubectl, kind: str, name: str) -> list[tuple[str, str, str]]:
    items = kubectl.json("get", "events", "-n", "default",
                         "--field-selector", f"involvedObject.kind={kind},involvedObject.name={name}")["items"]
    return [(e["type"], e["reason"], e["message"]) for e in items]


def target_pods(kubectl: Kubectl) -> list[str]:
    return [p["metadata"]["name"] for p in kubectl.json("get", "pods", "-n", "default")["items"]
            if RESTORE_FROM in (p["metadata"].get("annotations") or {})]
