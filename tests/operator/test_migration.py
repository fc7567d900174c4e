"""PodMigrations that move pods: through the operator, the agents' engine and the runc wrapper,
on the real cluster. What a user checks: the pod runs on the other node with its memory (same
token and checksum, the count goes on), the Deployment still has one replica, and a migration
stopped half-way leaves the pod where it was."""
from __future__ import annotations

import pytest

from opkit import (chart_operator, counter_image, crds, no_chart_operator, operator, resources,  # noqa: F401
                   runtime_class)
from opkit import EXAMPLES, COUNTER_IMAGE, counter_lines, counter_pod, events, get, needs_pod_engine, podmigration, \
    target_pods, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow, needs_pod_engine]


def counted(kubectl, pod: str, past: int = 0) -> tuple[str, int, str, float]:
    """The counter's last line once its count is beyond `past`."""
    return kubectl.wait_for(lambda: (lines := counter_lines(kubectl, pod)) and lines[-1][1] > past and lines[-1],
                            f"{pod} to count past {past}", timeout=120)


def assert_same_memory(kubectl, before: tuple, pod: str) -> tuple:
    """The pod runs the very process `before` came from: same token and data, the count went on."""
    after = counted(kubectl, pod, before[1])
    first = counter_lines(kubectl, pod)[0]
    assert (after[0], after[2]) == (before[0], before[2]), (before, after)
    assert first[1] > 1, first  # no fresh start at count 1
    return after


def test_example_moves_a_running_pod_with_its_memory(kubectl, operator, resources, counter_image):
    kubectl("apply", "-f", str(EXAMPLES / "counter-pod.yaml"))
    resources.track({"kind": "Pod", "metadata": {"name": "counter"}})
    source = kubectl.pod_running("counter")
    before = counted(kubectl, "counter", 2)
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
    after = assert_same_memory(kubectl, before, target)
    print(f"downtimeMs={status['downtimeMs']} longest pause the workload felt={after[3]} ms "
          f"iterations={status.get('iterations')} transferredBytes={status.get('transferredBytes')}")
    assert isinstance(status["downtimeMs"], int) and status["downtimeMs"] > 0
    assert ("Normal", "SuccessfulMigration", status["message"]) in events(kubectl, "PodMigration", "counter-to-node-2")
    assert ("Normal", "SuccessfulMigration", status["message"]) in events(kubectl, "Pod", target)
    row = kubectl("get", "pmig", "counter-to-node-2").stdout.splitlines()[1].split()
    assert row[:5] == ["counter-to-node-2", "counter", "Succeeded", "node-1", "node-2"]
    assert op.metric("memsnap_operator_migrations_total", phase="Succeeded") == 1
    assert op.metric("memsnap_operator_migration_downtime_seconds_count") == 1


def test_the_charts_operator_moves_a_pod(kubectl, chart_operator, resources, counter_image):
    """What `helm install` gives a user: the operator Deployment, in its pod, moves a pod through
    the agents of the DaemonSet."""
    resources(counter_pod("charted", "node-1"))
    kubectl.pod_running("charted")
    before = counted(kubectl, "charted", 2)
    resources(podmigration("charted-move", "charted", targetNode="node-2"))
    status = wait_phase(kubectl, "charted-move", timeout=300)["status"]
    assert status["phase"] == "Succeeded", status
    resources.track({"kind": "Pod", "metadata": {"name": status["targetPod"]}})
    assert kubectl.pod_running(status["targetPod"])["spec"]["nodeName"] == "node-2"
    assert get(kubectl, "pod", "charted") is None
    assert_same_memory(kubectl, before, status["targetPod"])
    assert "Forbidden" not in chart_operator()


def test_a_deployments_pod_moves_and_the_deployment_keeps_one_replica(kubectl, operator, resources, counter_image):
    labels = {"app": "ticker"}
    resources({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ticker", "namespace": "default"},
               "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                        "template": {"metadata": {"labels": labels},
                                     "spec": {"terminationGracePeriodSeconds": 1, "containers": [
                                         {"name": "main", "image": COUNTER_IMAGE, "imagePullPolicy": "Never",
                                          "args": ["16"]}]}}}})

    def pods() -> list[dict]:
        return [p for p in kubectl.json("get", "pods", "-l", "app=ticker")["items"]
                if not p["metadata"].get("deletionTimestamp")]
    source = kubectl.wait_for(lambda: [p for p in pods() if p["status"].get("phase") == "Running"],
                              "the Deployment's pod to run")[0]
    name, node = source["metadata"]["name"], source["spec"]["nodeName"]
    before = counted(kubectl, name, 2)
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
    assert_same_memory(kubectl, before, only["metadata"]["name"])
    # The ReplicaSet never counted zero pods: it created no replacement (a second copy of the workload).
    created = [m.rpartition(" ")[2] for t, r, m in events(kubectl, "ReplicaSet", owner[0]["name"])
               if r == "SuccessfulCreate"]
    assert created == [name], created


def test_deleting_a_podmigration_mid_flight_rolls_back(kubectl, operator, resources, counter_image):
    resources(counter_pod("slow", "node-1", mib=64))
    source = kubectl.pod_running("slow")
    before = counted(kubectl, "slow", 2)
    operator()
    # A trickle of bandwidth keeps it pre-copying long enough to be deleted there.
    resources(podmigration("slow-move", "slow", targetNode="node-2", policy={"bandwidthPerMigration": "4Mi"}))
    status = wait_phase(kubectl, "slow-move", phases=("PreCopying",), timeout=120)["status"]
    kubectl("delete", "pmig", "slow-move", "--wait=true", timeout=120)
    assert get(kubectl, "podmigration", "slow-move") is None
    kubectl.wait_for(lambda: target_pods(kubectl) == [], "the target pod to go")
    after = kubectl.pod_running("slow")
    assert after["metadata"]["uid"] == source["metadata"]["uid"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    assert "memsnap.io/migration" not in (after["metadata"].get("annotations") or {})
    assert_same_memory(kubectl, before, "slow")  # thawed: the same process counts on
    reasons = [m for t, r, m in events(kubectl, "Pod", "slow") if r == "FailedMigration"]
    assert reasons and "the PodMigration was deleted before the migration finished" in reasons[-1]
    assert status["targetPod"]


def test_a_restarted_operator_resumes(kubectl, operator, resources, counter_image):
    resources(counter_pod("steady", "node-1", mib=64))
    kubectl.pod_running("steady")
    before = counted(kubectl, "steady", 2)
    first = operator()
    resources(podmigration("steady-move", "steady", targetNode="node-2", policy={"bandwidthPerMigration": "8Mi"}))
    wait_phase(kubectl, "steady-move", phases=("PreCopying",), timeout=120)
    first.kill()  # SIGKILL mid-flight: no cleanup of its own
    operator()
    status = wait_phase(kubectl, "steady-move", timeout=300)["status"]
    assert status["phase"] == "Succeeded", status
    assert get(kubectl, "pod", "steady") is None
    assert kubectl.pod_running(status["targetPod"])["spec"]["nodeName"] == "node-2"
    assert_same_memory(kubectl, before, status["targetPod"])
