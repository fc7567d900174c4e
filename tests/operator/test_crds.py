"""The CRDs on a real API server: invalid specs are refused naming the field, defaults and
printer columns are what docs/operator.md says."""
from __future__ import annotations

import json

import pytest

from opkit import crds, no_chart_operator, operator, resources, runtime_class  # noqa: F401  (fixtures)
from opkit import podmigration

pytestmark = [pytest.mark.cluster]


def dry_run(kubectl, manifest: dict):
    """Create on the API server without storing it. kubectl's own check (from the published schema)
    is off, so that what refuses is the API server, as for any client."""
    return kubectl("create", "--dry-run=server", "--validate=false", "-o", "json", "-f", "-",
                   input=json.dumps(manifest), check=False)


@pytest.mark.parametrize("spec, field", [
    ({}, "spec.podName"),
    ({"podName": "Not_A_Pod"}, "spec.podName"),
    ({"podName": "web", "targetNode": "Node 2"}, "spec.targetNode"),
    ({"podName": "web", "policy": {"maxDowntimeMs": 0}}, "spec.policy.maxDowntimeMs"),
    ({"podName": "web", "policy": {"bandwidthPerMigration": "fast"}}, "spec.policy.bandwidthPerMigration"),
    ({"podName": "web", "policy": {"bandwidthPerMigration": "-1Mi"}}, "spec.policy.bandwidthPerMigration"),
    ({"podName": "web", "policy": {"progressTimeout": 0}}, "spec.policy.progressTimeout"),
    ({"podName": "web", "policy": {"allowAutoConverge": "yes"}}, "spec.policy.allowAutoConverge"),
])
def test_invalid_podmigrations_are_refused_naming_the_field(kubectl, crds, spec, field):
    manifest = podmigration("bad", "x")
    manifest["spec"] = spec
    proc = dry_run(kubectl, manifest)
    assert proc.returncode != 0, proc.stdout
    assert field in proc.stderr, proc.stderr
    print(proc.stderr.strip())


@pytest.mark.parametrize("spec, field", [
    ({"schedule": "5m"}, "spec.podName"),
    ({"podName": "web"}, "spec.schedule"),
    ({"podName": "web", "schedule": "often"}, "spec.schedule"),
    ({"podName": "web", "schedule": "5m", "retention": 0}, "spec.retention"),
    ({"podName": "web", "schedule": "5m", "storage": {"type": "S3"}}, "spec.storage.type"),
])
def test_invalid_podcheckpoints_are_refused_naming_the_field(kubectl, crds, spec, field):
    proc = dry_run(kubectl, {"apiVersion": "memsnap.io/v1alpha1", "kind": "PodCheckpoint",
                             "metadata": {"name": "bad", "namespace": "default"}, "spec": spec})
    assert proc.returncode != 0, proc.stdout
    assert field in proc.stderr, proc.stderr


def test_defaults_short_names_and_columns(kubectl, crds):
    made = json.loads(dry_run(kubectl, podmigration("defaults", "web", policy={"bandwidthPerMigration": "64Mi"})).stdout)
    assert made["spec"]["policy"] == {"maxDowntimeMs": 300, "bandwidthPerMigration": "64Mi",
                                      "completionTimeoutPerGiB": 150, "progressTimeout": 150,
                                      "allowAutoConverge": False}
    bare = json.loads(dry_run(kubectl, podmigration("bare", "web")).stdout)
    assert bare["spec"]["policy"]["maxDowntimeMs"] == 300
    ckpt = json.loads(dry_run(kubectl, {"apiVersion": "memsnap.io/v1alpha1", "kind": "PodCheckpoint",
                                        "metadata": {"name": "c", "namespace": "default"},
                                        "spec": {"podName": "web", "schedule": "1h30m"}}).stdout)
    assert ckpt["spec"]["retention"] == 3 and ckpt["spec"]["storage"]["type"] == "NodeLocal"

    # A real object (no operator runs in this test, so nothing acts on it) for the columns.
    kubectl.apply(podmigration("columns", "web"))
    try:
        lines = kubectl("get", "pmig", "columns", "-n", "default").stdout.splitlines()
        assert lines[0].split() == ["NAME", "POD", "PHASE", "SOURCE", "TARGET", "PROGRESS", "DOWNTIME-MS", "AGE"]
        assert lines[1].split()[:2] == ["columns", "web"]
        assert "MESSAGE" in kubectl("get", "podmigration", "columns", "-n", "default", "-o", "wide").stdout
    finally:
        kubectl("delete", "pmig", "columns", "-n", "default", "--ignore-not-found")
    assert kubectl("get", "pckpt", "-n", "default").returncode == 0
