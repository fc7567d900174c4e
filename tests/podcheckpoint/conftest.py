"""Fixtures for PodCheckpoints on the session's real cluster, reused from tests/podmigration (the
counter image, RuntimeClass memsnap, the agents' API as the admin identity) and tests/operator
(`memsnap operator` in a subprocess, the CRDs)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memsnap.cluster import oci
from memsnap.migration.podruntime import TASKS
from memsnap.nodes import runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))  # opkit: no package (see its docstring)

from opkit import counter_image, crds, no_chart_operator, operator, resources, runtime_class  # noqa: E402,F401
from podmigration.conftest import Agents, agent_api, counter_pod, lines, pods  # noqa: E402,F401

HERE = Path(__file__).resolve().parent
BREAKABLE_IMAGE = "memsnap.local/breakable:1"
ROOT = "/var/lib/memsnap/checkpoints"


@pytest.fixture(scope="session")
def breakable_image(cluster, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("breakable")
    binary = d / "breakable"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(HERE / "breakable.c")], check=True)
    oci.write_docker_archive(d / "breakable.tar", BREAKABLE_IMAGE, {"breakable": binary}, entrypoint=["/breakable"])
    cluster.load(d / "breakable.tar")
    return BREAKABLE_IMAGE


def on_node(node: str, *argv: str) -> subprocess.CompletedProcess:
    return runtime.run(node, list(argv), capture_output=True, text=True, timeout=60)


def signal_container(kubectl, pod: str, sig: str) -> None:
    """kill -SIG the pod's (only) container's init, as its node sees it."""
    cid = kubectl.json("get", "pod", pod)["status"]["containerStatuses"][0]["containerID"].split("://")[-1]
    proc = on_node(kubectl.json("get", "pod", pod)["spec"]["nodeName"], "sh", "-c",
                   f'kill -{sig} "$(cat {TASKS}/{cid}/init.pid)"')
    assert proc.returncode == 0, proc.stderr


def restored_pod(source: dict, name: str, node: str, restore_id: str) -> dict:
    """A pod restored by memsnap-runc from images the agent staged under restore_id."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "annotations": {"memsnap.io/restore-from": restore_id}},
            "spec": {**source["spec"], "nodeName": node, "runtimeClassName": "memsnap"}}
