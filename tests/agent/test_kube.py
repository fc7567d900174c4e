"""Pod names and selection from the Kubernetes API: a real API server with real pods on real
kubelets (the session's `memsnap cluster`), the agent on the host as node-1's.

The host sees every node's pod cgroups; the agent names only node-1's (its watch asks for
spec.nodeName=node-1), so node-2's pod stays known by UID with reason no-metadata."""
from __future__ import annotations

import json

import pytest
import yaml

from memsnap.cluster.testing import local_only, pod

from .conftest import free_port, wait_for

# local_only: the agent runs on the host and finds pods in the host's view of node-1's cgroups.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, local_only]

NODE = "node-1"


def labelled(name: str, namespace: str, node: str, labels: dict, container: str) -> dict:
    manifest = pod(name, node, ["sleep", "100000"])
    manifest["metadata"].update(namespace=namespace, labels=labels, annotations={"memsnap.io/track": "true"})
    manifest["spec"]["containers"][0]["name"] = container
    return manifest


@pytest.fixture(scope="module", autouse=True)
def the_only_agent_of_the_node(kubectl):
    """The chart's DaemonSet runs an agent in every node, and it would track node-1's annotated
    pods too: the first tracker of a pod holds its userfaultfd, and the other sees uffd-in-use.
    For this module, the DaemonSet keeps off node-1 (a node affinity), then comes back."""
    from memsnap.cluster import chart
    ds = ["-n", chart.NAMESPACE, "daemonset", chart.AGENT_DAEMONSET]
    if kubectl("get", *ds, check=False).returncode != 0:
        yield  # a bare cluster: the nodes' own agents track nothing unless asked
        return
    away = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [NODE]}]}]}}}
    kubectl("patch", *ds, "--type=merge", "-p", json.dumps({"spec": {"template": {"spec": {"affinity": away}}}}))
    try:
        kubectl("rollout", "status", *ds[2:], "-n", chart.NAMESPACE, "--timeout=240s", timeout=300)
        kubectl.wait_for(lambda: not [p for p in kubectl.json("get", "pods", "-n", chart.NAMESPACE, "-o", "json")["items"]
                                      if p["spec"].get("nodeName") == NODE and "agent" in p["metadata"]["name"]],
                         f"the chart's agent gone from {NODE}", 240)
        yield
    finally:
        kubectl("patch", *ds, "--type=json", "-p", '[{"op": "remove", "path": "/spec/template/spec/affinity"}]')
        kubectl("rollout", "status", *ds[2:], "-n", chart.NAMESPACE, "--timeout=240s", timeout=300)


@pytest.fixture
def namespaces(kubectl):
    for ns in ("shop", "billing"):
        kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    kubectl.wait_for(lambda: all(kubectl.json("get", "serviceaccount", "default", "-n", ns).get("secrets")
                                 for ns in ("shop", "billing")), "the namespaces' service-account tokens")
    yield
    kubectl("delete", "namespace", "shop", "billing", "--wait=true", timeout=300)
    kubectl("delete", "pod", "elsewhere-0", "--ignore-not-found", "--wait=true")


def uid_of(kubectl, namespace: str, name: str) -> str:
    return kubectl.pod_running(name, namespace)["metadata"]["uid"]


def test_names_come_from_the_api_and_selection_applies(agent, kubectl, namespaces):
    kubectl.apply(labelled("cart-0", "shop", NODE, {"app": "cart", "tier": "backend"}, "cart"))
    kubectl.apply(labelled("web-0", "shop", NODE, {"app": "web", "tier": "frontend"}, "nginx"))
    kubectl.apply(labelled("ledger-0", "billing", NODE, {"app": "cart"}, "ledger"))
    kubectl.apply(labelled("elsewhere-0", "default", "node-2", {"app": "cart"}, "away"))
    cart, web, ledger, elsewhere = (uid_of(kubectl, ns, n) for ns, n in
                                    (("shop", "cart-0"), ("shop", "web-0"), ("billing", "ledger-0"),
                                     ("default", "elsewhere-0")))
    a = agent("--node-name", NODE, "--namespace", "shop", "--selector", "app in (cart, web), tier!=frontend",
              "--annotation", "memsnap.io/track=true", interval=1.0, kubeconfig=str(kubectl.kubeconfig))

    def cart_rate():
        return a.value("memsnap_dirty_bytes_per_second", container="cart", namespace="shop", pod="cart-0")
    # Another tracker of the node's pods (an agent left running) shows here as reason uffd-in-use.
    wait_for(lambda: cart_rate() is not None, timeout=60, what="cart-0 exported under its names",
             explain=lambda: a.pod(cart))
    pods = {p["uid"]: p for p in a.api()["pods"]}
    assert (pods[cart]["namespace"], pods[cart]["name"]) == ("shop", "cart-0")
    # The pod's sandbox (pause) has a cgroup of its own but no name in the API: it keeps its ID.
    assert "cart" in {c["name"] for c in pods[cart]["containers"]}
    assert a.api("/api/v1/pods/shop/cart-0")["uid"] == cart
    assert a.get("/api/v1/pods/shop/nothing-here")[0] == 404

    def reasons(uid, container=None):
        """Of the named container only: containerd gives the sandbox (pause) its default seccomp
        profile, which refuses the userfaultfd() the uffd-wp backend injects."""
        return {(p.get("skipped", ""), p.get("detail", "")) for c in a.pod(uid)["containers"]
                if container in (None, c["name"]) for p in c["processes"]}
    wait_for(lambda: all(a.pod(u) for u in (web, ledger, elsewhere)), timeout=30, what="every pod discovered")
    assert reasons(cart, "cart") == {("", "")}
    assert reasons(web) == {("not-selected", "selector")}
    assert reasons(ledger) == {("not-selected", "namespace")}
    assert reasons(elsewhere) == {("no-metadata", "no-metadata")}
    assert a.value("memsnap_agent_info", kube_api="ok", node=NODE, version="0.1.0") == 1

    # A pod created while the agent runs arrives through its watch and is tracked by name.
    kubectl.apply(labelled("late-0", "shop", NODE, {"app": "cart"}, "late"))
    late = uid_of(kubectl, "shop", "late-0")
    def late_tracked():
        p = a.pod(late)
        named = [c for c in (p or {}).get("containers", []) if c["name"] == "late"]
        return p and p["name"] == "late-0" and named and not named[0]["processes"][0].get("skipped")
    wait_for(late_tracked, timeout=60, what="late-0 tracked")


def test_an_unreachable_api_leaves_tracking_by_uid(agent, kubectl, tmp_path):
    kubectl.apply(pod("lonely-0", NODE, ["sleep", "100000"]))
    try:
        uid = uid_of(kubectl, "default", "lonely-0")
        config = tmp_path / "kubeconfig"  # an API server that is not there: a closed loopback port
        config.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "gone",
            "clusters": [{"name": "gone", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
            "users": [{"name": "gone", "user": {}}],
            "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "gone"}}]}))
        a = agent("--node-name", NODE, interval=1.0, kubeconfig=str(config))
        wait_for(lambda: (p := a.pod(uid)) and p["namespace"] == "" and p["name"] == uid, timeout=60,
                 what="the pod tracked by UID")
        assert a.value("memsnap_agent_info", kube_api="error", node=NODE, version="0.1.0") == 1
    finally:
        kubectl("delete", "pod", "lonely-0", "--wait=true")
