"""Where a pod may go: the scheduler's filters that matter for a move (readiness, cordon,
nodeSelector, required node affinity, taints, room for the pod's resource requests, required
inter-pod affinity and anti-affinity, both ways), and never the pod's own node."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..model import MIB, quantity

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Cluster:
    """What placement weighs besides the pod and the node: the nodes by name and the pods that
    have not ended (Succeeded or Failed)."""

    nodes: Mapping[str, Obj] = field(default_factory=dict)
    pods: Sequence[Obj] = ()

    def on(self, node_name: str) -> Iterator[Obj]:
        return (p for p in self.pods if p["spec"].get("nodeName") == node_name)


def why_not(pod: Obj, node: Obj, cluster: Cluster = Cluster()) -> str | None:
    """Why pod cannot move to node, or None when it can."""
    name = node["metadata"]["name"]
    if name == pod["spec"].get("nodeName"):
        return f"{name} is the pod's own node"
    if not ready(node):
        return f"{name} is not Ready"
    if node.get("spec", {}).get("unschedulable"):
        return f"{name} is cordoned (unschedulable)"
    labels = node["metadata"].get("labels") or {}
    for key, value in (pod["spec"].get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return f"{name} does not match the pod's nodeSelector {key}={value}"
    terms = (((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {})
             .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms")
    if terms and not any(term_matches(t, node) for t in terms):
        return f"{name} does not match the pod's required node affinity"
    for taint in node.get("spec", {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and \
                not any(_tolerates(t, taint) for t in pod["spec"].get("tolerations") or []):
            return f"{name} has the taint {taint['key']}={taint.get('value', '')}:{taint['effect']}, " \
                   f"which the pod does not tolerate"
    return _no_room(pod, node, cluster) or _pod_affinity(pod, node, cluster)


def choose(pod: Obj, cluster: Cluster) -> tuple[Obj | None, dict[str, str]]:
    """The fitting node with the fewest pods (ties: by name), and why each other one does not fit."""
    fitting, refused = [], {}
    pods_on: dict[str, int] = {}
    for p in cluster.pods:
        pods_on[p["spec"].get("nodeName")] = pods_on.get(p["spec"].get("nodeName"), 0) + 1
    for node in cluster.nodes.values():
        reason = why_not(pod, node, cluster)
        if reason:
            refused[node["metadata"]["name"]] = reason
        else:
            fitting.append(node)
    fitting.sort(key=lambda n: (pods_on.get(n["metadata"]["name"], 0), n["metadata"]["name"]))
    return (fitting[0] if fitting else None), refused


# ---- resources ---------------------------------------------------------------------------

def requests(pod: Obj) -> dict[str, float]:
    """What the pod asks the scheduler for (cpu in cores, memory in bytes): its app containers'
    requests plus its overhead. A target pod runs no init containers, so they do not count."""
    total = {"cpu": 0.0, "memory": 0.0}
    blocks = [c.get("resources", {}).get("requests") or {} for c in pod["spec"].get("containers") or []]
    for block in blocks + [pod["spec"].get("overhead") or {}]:
        for resource in total:
            if resource in block:
                total[resource] += quantity(block[resource])
    return total


def _no_room(pod: Obj, node: Obj, cluster: Cluster) -> str | None:
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    name = node["metadata"]["name"]
    others = [p for p in cluster.on(name) if p["metadata"].get("uid") != pod["metadata"].get("uid")]
    if "pods" in allocatable and len(others) + 1 > quantity(allocatable["pods"]):
        return f"{name} runs {len(others)} pods, its limit"
    wanted, used = requests(pod), {"cpu": 0.0, "memory": 0.0}
    for other in others:
        for resource, amount in requests(other).items():
            used[resource] += amount
    for resource, amount in wanted.items():
        if amount and resource in allocatable and used[resource] + amount > quantity(allocatable[resource]):
            free = quantity(allocatable[resource]) - used[resource]
            return f"{name} has {_amount(resource, free)} {resource} left for requests, the pod requests " \
                   f"{_amount(resource, amount)}"
    return None


def _amount(resource: str, value: float) -> str:
    return f"{value / MIB:.0f} MiB" if resource == "memory" else f"{value:g} cores"


# ---- inter-pod affinity ---------------------------------------------------------------------

def _pod_affinity(pod: Obj, node: Obj, cluster: Cluster) -> str | None:
    """Required pod affinity and anti-affinity, the pod's own terms and, as the scheduler also
    checks, the anti-affinity terms of the pods already there. The pod itself does not count."""
    name = node["metadata"]["name"]
    others = [p for p in cluster.pods if p["metadata"].get("uid") != pod["metadata"].get("uid")]
    affinity = pod["spec"].get("affinity") or {}
    for term in _required(affinity, "podAffinity"):
        if not any(_same_domain(node, o, term, cluster) and _selects(term, pod, o) for o in others):
            return f"{name} has no pod matching the pod's required pod affinity in its {term['topologyKey']}"
    for term in _required(affinity, "podAntiAffinity"):
        for other in others:
            if _same_domain(node, other, term, cluster) and _selects(term, pod, other):
                return f"{name} shares its {term['topologyKey']} with pod {other['metadata']['name']}, " \
                       f"which the pod's required anti-affinity excludes"
    for other in others:
        for term in _required(other["spec"].get("affinity") or {}, "podAntiAffinity"):
            if _same_domain(node, other, term, cluster) and _selects(term, other, pod):
                return f"{name} shares its {term['topologyKey']} with pod {other['metadata']['name']}, " \
                       f"whose required anti-affinity excludes the pod"
    return None


def _required(affinity: Obj, kind: str) -> list[Obj]:
    return (affinity.get(kind) or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or []


def _same_domain(node: Obj, other: Obj, term: Obj, cluster: Cluster) -> bool:
    """`other` runs in the same topology domain (e.g. zone, host) as `node`."""
    key = term["topologyKey"]
    here = (node["metadata"].get("labels") or {}).get(key)
    there = cluster.nodes.get(other["spec"].get("nodeName") or "")
    return here is not None and there is not None and (there["metadata"].get("labels") or {}).get(key) == here


def _selects(term: Obj, owner: Obj, other: Obj) -> bool:
    """The term of `owner` selects `other`: its namespaces (default: owner's) and label selector."""
    namespaces = term.get("namespaces") or [owner["metadata"].get("namespace")]
    if other["metadata"].get("namespace") not in namespaces:
        return False
    selector = term.get("labelSelector")
    if selector is None:
        return False  # a term without a selector selects no pod
    labels = other["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()) and \
        all(_requirement(r, labels) for r in selector.get("matchExpressions") or [])


# ---- nodes ------------------------------------------------------------------------------------

def ready(node: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in node.get("status", {}).get("conditions") or [])


def internal_ip(node: Obj) -> str | None:
    """The node's InternalIP: where its agent listens (the agent's certificate names the node)."""
    for address in node.get("status", {}).get("addresses") or []:
        if address.get("type") == "InternalIP":
            return address["address"]
    return None


def term_matches(term: Obj, node: Obj) -> bool:
    labels = node["metadata"].get("labels") or {}
    fields = {"metadata.name": node["metadata"]["name"]}
    return all(_requirement(r, labels) for r in term.get("matchExpressions") or []) and \
        all(_requirement(r, fields) for r in term.get("matchFields") or [])


def _requirement(req: Obj, values: Mapping[str, str]) -> bool:
    key, op, wanted = req["key"], req["operator"], req.get("values") or []
    have = values.get(key)
    if op == "In":
        return have in wanted
    if op == "NotIn":
        return have not in wanted
    if op == "Exists":
        return key in values
    if op == "DoesNotExist":
        return key not in values
    if op in ("Gt", "Lt") and have is not None and wanted:
        try:
            a, b = int(have), int(wanted[0])
        except ValueError:
            return False
        return a > b if op == "Gt" else a < b
    return False


def _tolerates(toleration: Obj, taint: Obj) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("operator") == "Exists":
        return not toleration.get("key") or toleration["key"] == taint["key"]
    return toleration.get("key") == taint["key"] and toleration.get("value", "") == taint.get("value", "")
