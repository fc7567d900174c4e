"""Where a pod may move and what its target pod looks like: the operator's pure rules, on pod and
node objects as the API server returns them (the cluster tests cover the rest)."""
from __future__ import annotations

import json

import pytest

from memsnap_operator.migration import placement, target_pod
from memsnap_operator.model import MigrationRef, Policy, quantity


def node(name: str, labels=None, taints=None, ready=True, cordoned=False) -> dict:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": {"taints": taints or [], "unschedulable": cordoned},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "addresses": [{"type": "Hostname", "address": name},
                                     {"type": "InternalIP", "address": "198.18.0.12"}]}}


def pod(**spec) -> dict:
    return {"metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1", "resourceVersion": "7",
                         "labels": {"app": "web"}, "annotations": {"memsnap.io/migration": "m"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5f",
                                              "uid": "rs-1", "controller": True}]},
            "spec": {"nodeName": "node-1", "containers": [{"name": "main", "image": "x"}], **spec},
            "status": {"phase": "Running"}}


def test_never_the_pods_own_node_nor_an_unready_or_cordoned_one():
    assert placement.why_not(pod(), node("node-1")) == "node-1 is the pod's own node"
    assert placement.why_not(pod(), node("node-2", ready=False)) == "node-2 is not Ready"
    assert placement.why_not(pod(), node("node-2", cordoned=True)) == "node-2 is cordoned (unschedulable)"
    assert placement.why_not(pod(), node("node-2")) is None


def test_node_selector_and_required_affinity():
    p = pod(nodeSelector={"disk": "ssd"})
    assert "nodeSelector disk=ssd" in placement.why_not(p, node("node-2"))
    assert placement.why_not(p, node("node-2", {"disk": "ssd"})) is None
    terms = [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]},
                                   {"key": "gpu", "operator": "DoesNotExist"}]},
             {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-9"]}]}]
    p = pod(affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}})
    assert placement.why_not(p, node("node-2", {"zone": "b"})) is None
    assert "required node affinity" in placement.why_not(p, node("node-2", {"zone": "b", "gpu": "1"}))
    assert "required node affinity" in placement.why_not(p, node("node-2", {"zone": "c"}))
    assert placement.why_not(p, node("node-9")) is None  # the second term: by name


def test_taints_need_tolerations():
    taint = {"key": "dedicated", "value": "db", "effect": "NoSchedule"}
    assert "taint dedicated=db:NoSchedule" in placement.why_not(pod(), node("node-2", taints=[taint]))
    equal = [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]
    exists = [{"key": "dedicated", "operator": "Exists"}]
    wrong = [{"key": "dedicated", "operator": "Equal", "value": "web"}]
    assert placement.why_not(pod(tolerations=equal), node("node-2", taints=[taint])) is None
    assert placement.why_not(pod(tolerations=exists), node("node-2", taints=[taint])) is None
    assert placement.why_not(pod(tolerations=wrong), node("node-2", taints=[taint])) is not None
    soft = {"key": "x", "effect": "PreferNoSchedule"}
    assert placement.why_not(pod(), node("node-2", taints=[soft])) is None


def other(name: str, on: str, labels=None, namespace: str = "shop", **spec) -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"u-{name}", "labels": labels or {}},
            "spec": {"nodeName": on, "containers": [{"name": "c", "image": "x"}], **spec}}


def cluster(nodes: list[dict], pods: list[dict]) -> placement.Cluster:
    return placement.Cluster(nodes={n["metadata"]["name"]: n for n in nodes}, pods=pods)


def test_choice_takes_the_least_busy_fitting_node_and_says_why_not_the_others():
    nodes = [node("node-1"), node("node-2"), node("node-3"), node("node-4", ready=False)]
    busy = [other(f"b{i}", "node-2") for i in range(5)] + [other("c", "node-3")]
    chosen, refused = placement.choose(pod(), cluster(nodes, busy))
    assert chosen["metadata"]["name"] == "node-3"
    assert refused == {"node-1": "node-1 is the pod's own node", "node-4": "node-4 is not Ready"}
    assert placement.choose(pod(), cluster([node("node-1")], [])) == (None, {"node-1": "node-1 is the pod's own node"})
    assert placement.internal_ip(nodes[1]) == "198.18.0.12"


def test_resource_requests_must_fit_what_the_node_has_left():
    big = node("node-2")
    big["status"]["allocatable"] = {"cpu": "2", "memory": "4Gi", "pods": "3"}
    wants = pod(containers=[{"name": "a", "image": "x", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}},
                            {"name": "b", "image": "x", "resources": {"requests": {"memory": "512Mi"}}}],
                initContainers=[{"name": "i", "image": "x", "resources": {"requests": {"memory": "64Gi"}}}])
    assert placement.requests(wants) == {"cpu": 0.5, "memory": 1.5 * 2**30}  # init containers do not run again
    there = [other("db", "node-2", containers=[{"name": "c", "image": "x",
                                                "resources": {"requests": {"cpu": "1", "memory": "3Gi"}}}])]
    assert placement.why_not(wants, big, cluster([big], there)) == \
        "node-2 has 1024 MiB memory left for requests, the pod requests 1536 MiB"
    there[0]["spec"]["containers"][0]["resources"]["requests"]["memory"] = "2Gi"
    assert placement.why_not(wants, big, cluster([big], there)) is None
    there[0]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "1800m"
    assert placement.why_not(wants, big, cluster([big], there)) == \
        "node-2 has 0.2 cores cpu left for requests, the pod requests 0.5 cores"
    full = there + [other("x", "node-2"), other("y", "node-2")]
    assert placement.why_not(pod(), big, cluster([big], full)) == "node-2 runs 3 pods, its limit"
    # The pod's own entry (on its source node) never counts against a target.
    assert placement.why_not(wants, big, cluster([big], [wants])) is None


def test_required_pod_affinity_and_anti_affinity_both_ways():
    nodes = [node("node-1", {"zone": "a"}), node("node-2", {"zone": "a"}), node("node-3", {"zone": "b"})]
    web = {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}
    spread = pod(affinity={"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [web]}})
    replica = other("web-1", "node-2", {"app": "web"})
    c = cluster(nodes, [spread, replica])
    assert placement.why_not(spread, nodes[1], c) == \
        "node-2 shares its kubernetes.io/hostname with pod web-1, which the pod's required anti-affinity excludes"
    assert placement.why_not(spread, nodes[2], c) is None
    assert placement.why_not(spread, nodes[1], cluster(nodes, [spread, other("web-1", "node-2", {"app": "web"},
                                                                             namespace="other")])) is None
    # A pod already there whose own anti-affinity excludes the moving pod's labels.
    loner = other("loner", "node-3", {"app": "db"}, affinity={"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchExpressions": [
            {"key": "app", "operator": "In", "values": ["web"]}]}, "topologyKey": "zone"}]}})
    assert placement.why_not(pod(), nodes[2], cluster(nodes, [loner])) == \
        "node-3 shares its zone with pod loner, whose required anti-affinity excludes the pod"
    # Affinity: next to a cache, in the same zone.
    near = pod(affinity={"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "zone"}]}})
    cache = other("cache", "node-1", {"app": "cache"})
    assert placement.why_not(near, nodes[1], cluster(nodes, [cache])) is None
    assert placement.why_not(near, nodes[2], cluster(nodes, [cache])) == \
        "node-3 has no pod matching the pod's required pod affinity in its zone"


def test_target_pod_is_pinned_restored_and_not_counted_by_the_replicaset_until_handover():
    ref = MigrationRef("shop", "move-web", "abcdef12-3456", "web-0", "node-2", Policy(), None)
    source = pod(initContainers=[{"name": "init", "image": "x"}])
    target = target_pod.build(source, name="web-0-mig-abcde", node="node-2", migration=ref)
    meta, spec = target["metadata"], target["spec"]
    assert (meta["name"], meta["namespace"], meta["labels"]) == ("web-0-mig-abcde", "shop", {"app": "web"})
    assert "uid" not in meta and "resourceVersion" not in meta
    assert meta["annotations"]["memsnap.io/restore-from"] == "abcdef12-3456"
    assert "memsnap.io/migration" not in meta["annotations"]  # the source's lock stays on the source
    assert meta["ownerReferences"] == [{"apiVersion": "memsnap.io/v1alpha1", "kind": "PodMigration",
                                        "name": "move-web", "uid": "abcdef12-3456", "controller": True,
                                        "blockOwnerDeletion": False}]
    assert (spec["nodeName"], spec["runtimeClassName"], spec["hostname"]) == ("node-2", "memsnap", "web-0")
    assert "initContainers" not in spec
    adopt = target_pod.adopt_patch(target)
    assert adopt["metadata"]["ownerReferences"] == source["metadata"]["ownerReferences"]
    assert adopt["metadata"]["annotations"] == {target_pod.OWNERS: None}
    bare = pod()
    bare["metadata"]["ownerReferences"] = []
    assert target_pod.adopt_patch(target_pod.build(bare, name="t", node="node-2", migration=ref)) == \
        {"metadata": {"ownerReferences": None, "annotations": {target_pod.OWNERS: None}}}
    json.dumps(target)  # plain JSON for the API


@pytest.mark.parametrize("text, value", [("64Mi", 64 << 20), ("1G", 1e9), (0, 0), ("1.5Ki", 1536), ("500", 500)])
def test_quantities(text, value):
    assert quantity(text) == value


def test_policy_reaches_the_agent_in_its_own_names():
    policy = Policy.from_spec({"maxDowntimeMs": 200, "bandwidthPerMigration": "64Mi", "allowAutoConverge": True})
    assert policy.agent_fields() == {"max_downtime_ms": 200, "bandwidth_mib_s": 64.0,
                                     "completion_timeout_per_gib": 150.0, "progress_timeout": 150.0,
                                     "auto_converge": True}
    with pytest.raises(ValueError, match="not a quantity"):
        quantity("fast")
