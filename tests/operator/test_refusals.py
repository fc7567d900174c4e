"""Migrations the operator must refuse: Failed with the reason, an Event on the PodMigration
(and on the pod when there is one), and nothing touched: the pod is not changed in any way and
no target pod is made."""
from __future__ import annotations

import pytest

from opkit import crds, no_chart_operator, operator, resources, runtime_class  # noqa: F401  (fixtures)
from opkit import busybox_pod, events, get, podmigration, target_pods, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SLEEPER = ["sleep", "100000"]


def test_bad_requests_fail_with_the_reason_and_touch_nothing(kubectl, operator, resources):
    resources(busybox_pod("plain", "node-1", SLEEPER))
    resources(busybox_pod("hostnet", "node-1", SLEEPER, hostNetwork=True))
    resources(busybox_pod("hostpath", "node-1", SLEEPER,
                          volumes=[{"name": "logs", "hostPath": {"path": "/var/log"}}]))
    # Placement on the real objects: a neighbour the pod's anti-affinity excludes, and no room for
    # its cpu request next to a hog (each local node offers the host's cores).
    resources(busybox_pod("neighbour", "node-2", SLEEPER))
    resources(busybox_pod("lonely", "node-1", SLEEPER, affinity={"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "neighbour"}}, "topologyKey": "kubernetes.io/hostname"}]}}))
    resources(requesting(busybox_pod("hog", "node-2", SLEEPER), cpu="1"))
    resources(requesting(busybox_pod("hungry", "node-1", SLEEPER), cpu="1500m"))
    pods = {name: kubectl.pod_running(name) for name in ("plain", "hostnet", "hostpath", "lonely", "hungry")}
    op = operator()
    cases = {  # PodMigration -> (pod, spec, the reason it must give)
        "ghost": ("ghost", {}, "pod default/ghost does not exist"),
        "own-node": ("plain", {"targetNode": "node-1"}, "cannot migrate to node-1: node-1 is the pod's own node"),
        "no-such-node": ("plain", {"targetNode": "node-9"}, "node node-9 does not exist"),
        "hostnet": ("hostnet", {"targetNode": "node-2"}, "pod hostnet uses hostNetwork"),
        "hostpath": ("hostpath", {}, "pod hostpath mounts the hostPath volume logs (/var/log)"),
        "lonely": ("lonely", {"targetNode": "node-2"}, "cannot migrate to node-2: node-2 shares its "
                   "kubernetes.io/hostname with pod neighbour, which the pod's required anti-affinity excludes"),
        "hungry": ("hungry", {"targetNode": "node-2"}, "cpu left for requests, the pod requests 1.5 cores"),
    }
    for name, (pod, spec, _) in cases.items():
        resources(podmigration(name, pod, **spec))
    for name, (pod, _, reason) in cases.items():
        status = wait_phase(kubectl, name, timeout=60)["status"]
        assert status["phase"] == "Failed", status
        assert reason in status["message"]
        assert ("Warning", "FailedMigration", status["message"]) in events(kubectl, "PodMigration", name)
        if pod in pods:
            assert ("Warning", "FailedMigration", status["message"]) in events(kubectl, "Pod", pod)
        assert not status.get("targetPod")
    for name, before in pods.items():  # not even an annotation changed
        now = get(kubectl, "pod", name)
        assert now["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], name
    assert target_pods(kubectl) == []
    assert op.metric("memsnap_operator_migrations_total", phase="Failed") == len(cases)


def requesting(pod: dict, **requests: str) -> dict:
    pod["spec"]["containers"][0]["resources"] = {"requests": requests}
    return pod


def test_one_migration_per_pod(kubectl, operator, resources, runtime_class):
    """Two PodMigrations of one pod at once: one runs (here it rolls back, as no agent answers on
    the port the operator is given), the other is refused while the first holds the pod."""
    resources(busybox_pod("twice", "node-1", SLEEPER))
    source = kubectl.pod_running("twice")
    operator("--agent-port", "9")  # nothing listens there: the first ends RolledBack
    both = [podmigration(n, "twice", targetNode="node-2") for n in ("first", "second")]
    kubectl.apply({"apiVersion": "v1", "kind": "List", "items": both})  # one request after the other, at once
    for m in both:
        resources.track(m)
    results = {n: wait_phase(kubectl, n, timeout=120)["status"] for n in ("first", "second")}
    refused = [n for n, s in results.items() if s["phase"] == "Failed"]
    assert len(refused) == 1, results
    other = ({"first", "second"} - set(refused)).pop()
    assert results[refused[0]]["message"] == f"pod twice is already being migrated by PodMigration {other}"
    assert results[other]["phase"] == "RolledBack", results[other]
    after = kubectl.pod_running("twice")
    assert after["metadata"]["uid"] == source["metadata"]["uid"]
    assert "memsnap.io/migration" not in (after["metadata"].get("annotations") or {})
