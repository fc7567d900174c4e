"""PodMigrations that move pods: through the operator, the agents' engine and the runc wrapper,
on the real cluster. What a user checks: the pod runs on the other node with its memory (the
counter goes on where it was), the Deployment still has one replica, and a migration stopped
half-way leaves the pod where it was."""
from __future__ import annotations

import re

import pytest

from opkit import crds, operator, resources, runtime_class  # noqa: F401  (fixtures)
from opkit import EXAMPLES, COUNTER, BUSYBOX_IMAGE, busybox_pod, events, get, needs_pod_engine, podmigration, \
    target_pods, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow, needs_pod_engine]


def counts(kubectl, pod: str) -> list[int]:
    return [int(c) for c in re.findall(r"count=(\d+)", kubectl("logs", pod, check=False).stdout)]


def counted_to(kubectl, pod: str, n: int) -> int:
    return kubectl.wait_for(lambda: (c := counts(kubectl, pod)) and c[-1] >= n and c[-1], f"{pod} to count to {n}")


def test_example_moves_a_running_pod_with_its_memory(kubectl, operator, resources):
    kubectl("apply", "-f", str(EXAMPLES / "counter-pod.yaml"))
    resources.track({"kind": "Pod", "metadata": {"name": "counter"}})
    source = kubectl.pod_running("counter")
    before = counted_to(kubectl, "counter", 10)
    op = operator()
    kubectl("apply", "-f", str(EXAMPLES / "podmigration.yaml"))
    resources.track({"kind": "PodMigration", "metadata": {"name": "counter-to-node-2"}})
    status = wait_phase(kubectl, "counter-to-node-2", timeout=300)["status"]
    assert status["phase"] == "Succeeded", status
    target = status["targetPod"]
    resources.track({"kind": "Pod", "metadata": {"name": target}})
    moved = kubectl.pod_running(target)
    assert moved["spec"]["nodeName"] == "node-2"
    assert moved["metadata"]["labels"] == source["metadata"]["labels"]
    assert get(kubectl, "pod", "counter") is None  # the source pod is gone
    # Its memory came along: the count goes on from where it was, it does not start at 1.
    after = counts(kubectl, target)
    assert after and after[0] > before, (before, after[:5])
    counted_to(kubectl, target, after[-1] + 5)  # and it keeps counting there
    assert isinstance(status["downtimeMs"], int) and status["downtimeMs"] >= 0
    assert ("Normal", "SuccessfulMigration", status["message"]) in events(kubectl, "PodMigration", "counter-to-node-2")
    assert ("Normal", "SuccessfulMigration", status["message"]) in events(kubectl, "Pod", target)
    row = kubectl("get", "pmig", "counter-to-node-2").stdout.splitlines()[1].split()
    assert row[:5] == ["counter-to-node-2", "counter", "Succeeded", "node-1", "node-2"]
    assert op.metric("memsnap_operator_migrations_total", phase="Succeeded") == 1
    assert op.metric("memsnap_operator_migration_downtime_seconds_count") == 1


def test_a_deployments_pod_moves_and_the_deployment_keeps_one_replica(kubectl, operator, resources):
    labels = {"app": "ticker"}
    resources({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ticker", "namespace": "default"},
               "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                        "template": {"metadata": {"labels": labels},
                                     "spec": {"terminationGracePeriodSeconds": 1, "containers": [
                                         {"name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                                          "command": COUNTER}]}}}})

    def pods() -> list[dict]:
        return [p for p in kubectl.json("get", "pods", "-l", "app=ticker")["items"]
                if not p["metadata"].get("deletionTimestamp")]
    source = kubectl.wait_for(lambda: [p for p in pods() if p["status"].get("phase") == "Running"],
                              "the Deployment's pod to run")[0]
    name, node = source["metadata"]["name"], source["spec"]["nodeName"]
    before = counted_to(kubectl, name, 10)
    operator()
    resources(podmigration("ticker-move", name))  # no targetNode: the operator picks the other node
    status = wait_phase(kubectl, "ticker-move", timeout=300)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["targetNode"] == ({"node-1", "node-2"} - {node}).pop()

    def settled():
        ps = pods()
        deployment = kubectl.json("get", "deployment", "ticker")["status"]
        return ps if len(ps) == 1 and deployment.get("readyReplicas") == 1 and deployment.get("replicas") == 1 \
            and ps[0]["status"].get("phase") == "Running" else None
    (only,) = kubectl.wait_for(settled, "the Deployment to settle at one replica")
    assert only["metadata"]["name"] == status["targetPod"]
    owner = [o for o in only["metadata"]["ownerReferences"] if o.get("controller")]
    assert [o["kind"] for o in owner] == ["ReplicaSet"]
    assert owner[0]["uid"] == [o for o in source["metadata"]["ownerReferences"] if o.get("controller")][0]["uid"]
    assert counts(kubectl, only["metadata"]["name"])[0] > before


def test_deleting_a_podmigration_mid_flight_rolls_back(kubectl, operator, resources):
    resources(busybox_pod("slow", "node-1"))
    source = kubectl.pod_running("slow")
    operator()
    # A trickle of bandwidth keeps it pre-copying long enough to be deleted there.
    resources(podmigration("slow-move", "slow", targetNode="node-2", policy={"bandwidthPerMigration": "8Ki"}))
    status = wait_phase(kubectl, "slow-move", phases=("PreCopying",), timeout=120)["status"]
    kubectl("delete", "pmig", "slow-move", "--wait=true", timeout=120)
    assert get(kubectl, "podmigration", "slow-move") is None
    kubectl.wait_for(lambda: target_pods(kubectl) == [], "the target pod to go")
    after = kubectl.pod_running("slow")
    assert after["metadata"]["uid"] == source["metadata"]["uid"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    assert "memsnap.io/migration" not in (after["metadata"].get("annotations") or {})
    n = counts(kubectl, "slow")[-1]
    counted_to(kubectl, "slow", n + 5)  # thawed: it counts on
    reasons = [(t, r, m) for t, r, m in events(kubectl, "Pod", "slow") if r == "FailedMigration"]
    assert reasons and "the PodMigration was deleted before the migration finished" in reasons[-1][2]
    assert status["targetPod"]


def test_a_restarted_operator_resumes(kubectl, operator, resources):
    resources(busybox_pod("steady", "node-1"))
    kubectl.pod_running("steady")
    before = counted_to(kubectl, "steady", 10)
    first = operator()
    resources(podmigration("steady-move", "steady", targetNode="node-2", policy={"bandwidthPerMigration": "64Ki"}))
    wait_phase(kubectl, "steady-move", phases=("PreCopying",), timeout=120)
    first.kill()  # SIGKILL mid-flight: no cleanup of its own
    operator()
    status = wait_phase(kubectl, "steady-move", timeout=300)["status"]
    assert status["phase"] == "Succeeded", status
    assert get(kubectl, "pod", "steady") is None
    assert kubectl.pod_running(status["targetPod"])["spec"]["nodeName"] == "node-2"
    assert counts(kubectl, status["targetPod"])[0] > before
