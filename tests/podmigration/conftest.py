"""Fixtures for pod migrations on the session's real cluster: the counter image, RuntimeClass
memsnap, and the agents' API (as the host's admin identity, like the operator)."""
from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from memsnap.cluster import oci
from memsnap.nodes import agents

IMAGE = "memsnap.local/counter:1"
HERE = Path(__file__).resolve().parent
LINE = re.compile(r"^token=(\w+) count=(\d+) sum=(\w+) maxgap_ms=([\d.]+)$")


@pytest.fixture(scope="session")
def counter_image(cluster, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("counter")
    binary = d / "counter"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(HERE / "counter.c")], check=True)
    oci.write_docker_archive(d / "counter.tar", IMAGE, {"counter": binary, "tmp": ("dir", 0o1777)},
                             entrypoint=["/counter"])
    cluster.load(d / "counter.tar")
    return IMAGE


@pytest.fixture(scope="session")
def runtime_class(kubectl) -> str:
    existed = kubectl("get", "runtimeclass", "memsnap", check=False).returncode == 0
    kubectl.apply({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "memsnap"},
                   "handler": "memsnap"})
    yield "memsnap"
    if not existed:
        kubectl("delete", "runtimeclass", "memsnap", "--ignore-not-found")


def counter_pod(name: str, node: str, mib: int = 64, image: str = IMAGE) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                                            "labels": {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "volumes": [{"name": "scratch", "emptyDir": {}}],
                     "containers": [{"name": "counter", "image": image, "imagePullPolicy": "Never",
                                     "args": [str(mib)], "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}]}}


def target_pod(source: dict, name: str, node: str, mig_id: str) -> dict:
    """What the operator makes: the source's spec pinned to node, RuntimeClass memsnap, restore-from."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": source["metadata"]["namespace"],
                        "labels": dict(source["metadata"].get("labels") or {}),
                        "annotations": {"memsnap.io/restore-from": mig_id}},
           "spec": {**source["spec"], "nodeName": node, "runtimeClassName": "memsnap"}}
    return pod


@dataclass
class Line:
    token: str
    count: int
    sum: str
    maxgap_ms: float


def lines(kubectl, name: str) -> list[Line]:
    out = kubectl("logs", name, check=False).stdout
    return [Line(m[1], int(m[2]), m[3], float(m[4])) for m in map(LINE.match, out.splitlines()) if m]


def new_id() -> str:
    return str(uuid.uuid4())


class Agents:
    """The agents' pod-migration API, called from the host as the admin identity."""

    def call(self, node: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        async def go():
            async with agents.client(node) as c:
                async with c.request(method, path, json=body) as resp:
                    return resp.status, await resp.json()
        return asyncio.run(go())


@pytest.fixture
def agent_api() -> Agents:
    return Agents()


@pytest.fixture
def pods(kubectl):
    """Names of pods a test made; deleted at its end, whatever happened."""
    made: list[str] = []
    yield made
    if made:
        kubectl("delete", "pod", *made, "--ignore-not-found", "--grace-period=0", "--force", check=False)
        kubectl("wait", "--for=delete", "pod", *made, "--timeout=60s", check=False)
