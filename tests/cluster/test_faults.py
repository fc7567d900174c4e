"""Faults, in order: a killed kubelet, `up` over the remains of a crash, then `down` (twice).

Marked destructive, these run after every other cluster test (tests/conftest.py) and leave the
cluster down; the session fixture's own `down` is then a no-op."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from memsnap import nodes, procfs
from memsnap.cluster import state, worker
from memsnap.cluster.testing import COUNT, local_only, run_cli
from memsnap.nodes import cgroups, net

pytestmark = [pytest.mark.cluster(destructive=True), pytest.mark.slow, local_only]


def ready(kubectl, node: str) -> str:
    item = kubectl.json("get", "node", node)
    return next(c["status"] for c in item["status"]["conditions"] if c["type"] == "Ready")


def status_lines() -> dict[str, str]:
    proc = run_cli("status")
    return {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}


def test_a_killed_kubelet_makes_its_node_not_ready_and_status_says_why(cluster, kubectl):
    os.kill(worker.daemons("node-2")["kubelet"], signal.SIGKILL)
    kubectl.wait_for(lambda: ready(kubectl, "node-2") != "True", "node-2 to go NotReady")
    lines = status_lines()
    assert run_cli("status").returncode == 1
    assert "NotReady" in lines["node-2"] and "kubelet not running" in lines["node-2"]
    assert str(state.node_log("node-2", "kubelet")) in lines["node-2"]
    assert state.node_log("node-2", "kubelet").is_file()
    assert lines["node-1"].split()[1:] == ["Ready"]
    assert ready(kubectl, "node-1") == "True"


def test_up_after_a_crash_clears_the_remains(cluster, kubectl):
    # On top of the dead kubelet: the API server dies too, as if the host side had crashed.
    old = state.load()
    os.kill(old.processes["kube-apiserver"].pid, signal.SIGKILL)
    proc = run_cli("up", "--nodes", str(COUNT), timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "clearing the remains of a previous cluster" in proc.stderr
    assert not any(p.running for p in old.processes.values())
    status = json.loads(run_cli("status", "--json").stdout)
    assert status["healthy"], f"{status}\n{proc.stderr}"
    assert {ready(kubectl, f"node-{i}") for i in range(1, COUNT + 1)} == {"True"}


def test_down_removes_everything_and_twice_is_fine(cluster):
    st = state.load()
    started = [(p.pid, p.starttime) for p in st.processes.values()]
    started += [(pid, procfs.read_stat(pid).starttime) for n in st.nodes for pid in worker.daemons(n).values()]
    started += [(n.pid, n.starttime) for n in nodes.list_nodes() if n.name in st.nodes]
    found = {n: worker.daemons(n) for n in st.nodes}
    logs = "\n".join(state.log_tail(state.node_log(n, c), 3) for n in st.nodes for c in ("containerd", "kubelet"))
    assert len(started) == 4 + 3 * COUNT, f"not all running: {found}\n{run_cli('status').stdout}\n{logs}"
    proc = run_cli("down", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not any(procfs.alive(pid, t) for pid, t in started)
    assert not state.STATE_DIR.exists() and not state.DATA_DIR.exists()
    assert not [n for n in nodes.list_nodes() if n.name in st.nodes]
    assert not any(any(p.exists() for p in cgroups.paths(n).values()) for n in st.nodes)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not any(net.host_veth(n) in links for n in st.nodes)
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert "198.19." not in routes
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(state.DATA_DIR) not in mounts and "/var/lib/memsnap/nodes/node-" not in mounts
    proc = run_cli("down")
    assert proc.returncode == 0 and "no cluster was up" in proc.stderr
    assert run_cli("status").returncode == 1
