"""A real cluster: API server, controllers, scheduler, kubelets, containerd. `memsnap cluster`'s
own by default; the tests not marked local_only also run on kind (MEMSNAP_TEST_CLUSTER=kind)."""
from __future__ import annotations

import json

import pytest

from memsnap.cluster import state
from memsnap.cluster.testing import COUNT, busybox_archive, local_only, pod, run_cli

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_the_workers_are_ready(cluster, kubectl):
    nodes = kubectl.json("get", "nodes")["items"]
    ready = {n["metadata"]["name"]: next(c["status"] for c in n["status"]["conditions"] if c["type"] == "Ready")
             for n in nodes}
    assert {name: ready.get(name) for name in cluster.nodes} == {name: "True" for name in cluster.nodes}


@local_only
def test_nodes_have_their_addresses_and_status_says_all_runs(cluster, kubectl):
    nodes = kubectl.json("get", "nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == [f"node-{i}" for i in range(1, COUNT + 1)]
    addresses = {n["metadata"]["name"]: [a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP"]
                 for n in nodes}
    assert addresses == {f"node-{i}": [f"198.18.0.{10 + i}"] for i in range(1, COUNT + 1)}
    proc = run_cli("status", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(proc.stdout)
    assert status["healthy"] and set(status["nodes"]) == {"node-1", "node-2"}
    assert set(status["components"].values()) == {"running"}
    assert run_cli("kubeconfig").stdout.strip() == str(state.ADMIN_KUBECONFIG)


@local_only
def test_up_when_up_says_so(cluster):
    proc = run_cli("up", "--nodes", str(COUNT))
    assert proc.returncode == 0
    assert "already up" in proc.stderr


@local_only
def test_bad_input_gets_one_line_errors(cluster, tmp_path):
    proc = run_cli("up", "--nodes", "0")
    assert proc.returncode == 2 and "--nodes must be between 1 and" in proc.stderr
    not_an_image = tmp_path / "x.tar"
    not_an_image.write_text("hello")
    proc = run_cli("load", str(not_an_image))
    assert proc.returncode == 2 and "is not a tar archive" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run_cli("load", str(tmp_path / "missing.tar"))
    assert proc.returncode == 2 and "no such image archive" in proc.stderr


def test_a_local_image_runs_on_a_chosen_node_with_logs_and_exec(cluster, kubectl):
    node = cluster.nodes[1]
    kubectl.apply(pod("hello", node, ["sh", "-c", "echo hello from $(hostname); exec sleep 100000"]))
    try:
        p = kubectl.pod_running("hello")
        assert p["spec"]["nodeName"] == node
        assert p["status"]["podIP"].startswith(cluster.pod_prefix(node))
        kubectl.wait_for(lambda: "hello from hello" in kubectl("logs", "hello").stdout, "the pod's output")
        assert kubectl("exec", "hello", "--", "cat", "/proc/1/cmdline").stdout.startswith("sleep")
        # Its service-account token is mounted, signed for the API server.
        token = kubectl("exec", "hello", "--", "cat",
                        "/var/run/secrets/kubernetes.io/serviceaccount/token").stdout
        assert token.count(".") == 2
    finally:
        kubectl("delete", "pod", "hello", "--wait=true")


def test_the_scheduler_places_a_pod_without_a_node_name(cluster, kubectl):
    manifest = pod("placed", "", ["sleep", "100000"])
    del manifest["spec"]["nodeName"]
    kubectl.apply(manifest)
    try:
        assert kubectl.pod_running("placed")["spec"]["nodeName"] in cluster.nodes
    finally:
        kubectl("delete", "pod", "placed", "--wait=true")


def test_pods_on_different_nodes_reach_each_other(cluster, kubectl):
    server = pod("web", cluster.nodes[0], ["sh", "-c", "mkdir -p /www && echo served-by-node-1 > /www/index.html "
                                           "&& exec httpd -f -p 8080 -h /www"])
    kubectl.apply(server)
    kubectl.apply(pod("client", cluster.nodes[1], ["sleep", "100000"]))
    try:
        ip = kubectl.pod_running("web")["status"]["podIP"]
        assert ip.startswith(cluster.pod_prefix(cluster.nodes[0]))
        kubectl.pod_running("client")
        fetched = kubectl.wait_for(
            lambda: kubectl("exec", "client", "--", "wget", "-qO-", "-T", "3", f"http://{ip}:8080/",
                            check=False).stdout, "the client to reach the server")
        assert fetched.strip() == "served-by-node-1"
    finally:
        kubectl("delete", "pod", "web", "client", "--wait=true")


def test_an_oci_layout_loads_and_runs(cluster, kubectl, tmp_path):
    cluster.load(busybox_archive(tmp_path / "oci.tar", "memsnap.local/busybox-oci:1", oci_layout=True))
    kubectl.apply(pod("from-oci", cluster.nodes[0], ["sh", "-c", "echo layout-ok; exec sleep 100000"],
                      image="memsnap.local/busybox-oci:1"))
    try:
        kubectl.pod_running("from-oci")
        kubectl.wait_for(lambda: "layout-ok" in kubectl("logs", "from-oci").stdout, "the pod's output")
    finally:
        kubectl("delete", "pod", "from-oci", "--wait=true")
