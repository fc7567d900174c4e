"""Failures after the target pod exists: the migration rolls back. The source pod runs on as it
was (same pod, no restart, its memory still counting), the target pod is deleted, the pod is
free for the next migration, and the Events say why."""
from __future__ import annotations

import re

import pytest

from opkit import crds, no_chart_operator, operator, resources, runtime_class  # noqa: F401  (fixtures)
from opkit import POD_ENGINE, busybox_pod, events, podmigration, target_pods, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def last_count(kubectl, pod: str) -> int:
    counts = re.findall(r"count=(\d+)", kubectl("logs", pod).stdout)
    return int(counts[-1]) if counts else 0


def assert_source_untouched(kubectl, before: dict) -> None:
    name = before["metadata"]["name"]
    after = kubectl.pod_running(name)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"]["nodeName"] == before["spec"]["nodeName"]
    assert [c["restartCount"] for c in after["status"]["containerStatuses"]] == [0]
    assert "memsnap.io/migration" not in (after["metadata"].get("annotations") or {})
    count = last_count(kubectl, name)
    kubectl.wait_for(lambda: last_count(kubectl, name) > count, f"{name} to go on counting", timeout=30)


def test_unreachable_agent_rolls_back(kubectl, operator, resources):
    resources(busybox_pod("lonely", "node-1"))
    source = kubectl.pod_running("lonely")
    op = operator("--agent-port", "9")  # no agent there: connection refused
    resources(podmigration("lonely-move", "lonely", targetNode="node-2"))
    status = wait_phase(kubectl, "lonely-move")["status"]
    assert status["phase"] == "RolledBack", status
    assert status["message"].startswith("rolled back: the agent of node-1 did not start the migration: ")
    assert "198.18.0.11:9" in status["message"]
    assert (status["sourceNode"], status["targetNode"]) == ("node-1", "node-2")
    ready = {c["type"]: c for c in status["conditions"]}["TargetReady"]
    assert ready["status"] == "True"  # it got that far: the target pod had its sandbox
    assert target_pods(kubectl) == []
    assert kubectl("get", "pod", status["targetPod"], check=False).returncode != 0
    assert ("Warning", "FailedMigration", status["message"]) in events(kubectl, "PodMigration", "lonely-move")
    assert ("Warning", "FailedMigration", status["message"]) in events(kubectl, "Pod", "lonely")
    assert_source_untouched(kubectl, source)
    assert op.metric("memsnap_operator_migrations_total", phase="RolledBack") == 1


@pytest.mark.skipif(POD_ENGINE, reason="the agents accept pod migrations in this tree")
def test_agent_refusal_rolls_back(kubectl, operator, resources):
    """An agent that answers with an error (here: one without the pod migration API, which takes
    the request for a bad pid migration)."""
    resources(busybox_pod("refused", "node-1"))
    source = kubectl.pod_running("refused")
    operator()
    resources(podmigration("refused-move", "refused"))
    status = wait_phase(kubectl, "refused-move")["status"]
    assert status["phase"] == "RolledBack", status
    assert "the agent of node-1 did not start the migration: node-1: POST /api/v1/migrations: 400" in status["message"]
    assert status["targetNode"] == "node-2"  # chosen: the only other node
    assert target_pods(kubectl) == []
    assert_source_untouched(kubectl, source)
