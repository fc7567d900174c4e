"""PodCheckpoints driven by `memsnap operator` on the real cluster: scheduled checkpoints in
status with retention kept, failures reported as Events, the images removed with the resource."""
from __future__ import annotations

import pytest

from .conftest import Agents, ROOT, counter_pod, lines, on_node

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NODE = "node-1"


def podcheckpoint(name: str, pod: str, schedule: str = "5s", retention: int = 2) -> dict:
    return {"apiVersion": "memsnap.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"podName": pod, "schedule": schedule, "retention": retention}}


def _pckpt(kubectl, name: str) -> dict:
    return kubectl.json("get", "podcheckpoint", name)


def _events(kubectl, name: str) -> list[tuple[str, str, str]]:
    items = kubectl.json("get", "events", "--field-selector", f"involvedObject.kind=PodCheckpoint,involvedObject.name={name}")["items"]
    return [(e["type"], e["reason"], e["message"]) for e in items]


def test_scheduled_checkpoints_kept_within_retention(kubectl, operator, counter_image, resources):
    operator()
    resources(counter_pod("pckpt-counter", NODE, mib=16))
    kubectl.pod_running("pckpt-counter")
    resources(podcheckpoint("every-5s", "pckpt-counter"))
    first = kubectl.wait_for(lambda: (_pckpt(kubectl, "every-5s").get("status") or {}).get("checkpoints"),
                             "a first checkpoint in status", timeout=120)[0]

    def rolled_on():  # retention 2: the first one went once two newer ones came
        st = _pckpt(kubectl, "every-5s").get("status") or {}
        names = [c["name"] for c in st.get("checkpoints") or []]
        return st if len(names) == 2 and first["name"] not in names else None
    status = kubectl.wait_for(rolled_on, "checkpoints past retention", timeout=180)
    assert status["phase"] == "Active" and status["node"] == NODE and status["replicaNode"] == "node-2", status
    assert status["lastCheckpointTime"] == status["checkpoints"][-1]["time"], status
    assert all(c["size"] > 0 and c["layers"] >= 1 for c in status["checkpoints"]), status
    uid = _pckpt(kubectl, "every-5s")["metadata"]["uid"]
    code, listed = Agents().call(NODE, "GET", f"/api/v1/checkpoints/{uid}")
    assert code == 200 and len(listed["checkpoints"]) == 2, listed  # the node keeps what status says
    assert kubectl("get", "pckpt").stdout.count("every-5s") == 1

    kubectl("delete", "podcheckpoint", "every-5s", "--wait=true", timeout=120)
    for node in (NODE, "node-2"):  # the images went with it, and their copy
        assert on_node(node, "test", "-e", f"{ROOT}/{uid}").returncode == 1, node
    # The pod ran on throughout, never restarted.
    assert kubectl.json("get", "pod", "pckpt-counter")["status"]["containerStatuses"][0]["restartCount"] == 0


def test_failures_are_reported(kubectl, operator, resources):
    operator()
    resources(podcheckpoint("no-such-pod", "does-not-exist"))
    status = kubectl.wait_for(lambda: (st := _pckpt(kubectl, "no-such-pod").get("status") or {}).get("phase") == "Failed"
                              and st, "the PodCheckpoint to fail")
    assert "pod default/does-not-exist does not exist" in status["message"], status
    kubectl.wait_for(lambda: any(r == "CheckpointFailed" and "does-not-exist" in m for _, r, m in _events(kubectl, "no-such-pod")),
                     "a CheckpointFailed Event")
    resources(podcheckpoint("on-pvc", "does-not-exist") | {"spec": {"podName": "x", "schedule": "1m",
                                                                    "storage": {"type": "PVC", "claimName": "c"}}})
    status = kubectl.wait_for(lambda: (st := _pckpt(kubectl, "on-pvc").get("status") or {}).get("phase") == "Failed"
                              and st, "the PVC PodCheckpoint to be refused")
    assert "PVC is not implemented" in status["message"], status
    kubectl("delete", "podcheckpoint", "no-such-pod", "on-pvc", "--wait=true", timeout=60)


def test_pod_comes_back_from_its_checkpoint_after_its_node_died(kubectl, operator, counter_image, resources):
    """A PodMigration with fromCheckpoint, node-1 frozen (as good as dead): the pod runs again on
    node-2 from the copy of its newest checkpoint, with the memory it had then."""
    from memsnap.nodes import cgroups
    operator()
    resources(counter_pod("pckpt-lost", NODE, mib=32))
    kubectl.pod_running("pckpt-lost")
    resources(podcheckpoint("lost-every-5s", "pckpt-lost"))
    first = kubectl.wait_for(lambda: (st := _pckpt(kubectl, "lost-every-5s").get("status") or {}).get("replicaNode")
                             and st["lastCheckpointTime"], "a checkpoint copied to node-2", timeout=120)
    kubectl.wait_for(lambda: (_pckpt(kubectl, "lost-every-5s").get("status") or {}).get("lastCheckpointTime") != first,
                     "a second checkpoint", timeout=60)
    before = lines(kubectl, "pckpt-lost")[-1]
    cgroups.freeze(NODE)
    try:
        last = (_pckpt(kubectl, "lost-every-5s").get("status") or {})["lastCheckpointTime"]
        resources({"apiVersion": "memsnap.io/v1alpha1", "kind": "PodMigration",
                   "metadata": {"name": "bring-back", "namespace": "default"},
                   "spec": {"podName": "pckpt-lost", "fromCheckpoint": "lost-every-5s"}})
        pmig = kubectl.wait_for(lambda: (st := (kubectl.json("get", "pmig", "bring-back").get("status") or {}))
                                .get("phase") in ("Succeeded", "Failed") and st, "the restore", timeout=180)
        assert pmig["phase"] == "Succeeded", pmig
        assert pmig["targetNode"] == "node-2" and last in pmig["message"], pmig
        restored = pmig["targetPod"]
        assert kubectl("get", "pod", "pckpt-lost", check=False).returncode != 0  # the lost pod's object went
        first_line = kubectl.wait_for(lambda: lines(kubectl, restored)[:1] or None, "the restored counter")[0]
        assert (first_line.token, first_line.sum) == (before.token, before.sum), (before, first_line)
        assert first_line.count > 1, first_line  # its memory, not a fresh start
        assert kubectl.json("get", "pod", restored)["spec"]["nodeName"] == "node-2"
    finally:
        cgroups.thaw(NODE)
    resources.track({"kind": "Pod", "metadata": {"name": restored, "namespace": "default"}})
