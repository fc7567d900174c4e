"""Where a pod may go: the scheduler's node filters that matter for a move (readiness, cordon,
nodeSelector, required node affinity, taints), and never the pod's own node."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

Obj = Mapping[str, Any]


def why_not(pod: Obj, node: Obj) -> str | None:
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
    return None


def choose(pod: Obj, nodes: Iterable[Obj], pods_on: Mapping[str, int]) -> tuple[Obj | None, dict[str, str]]:
    """The fitting node with the fewest pods (ties: by name), and why each other one does not fit."""
    fitting, refused = [], {}
    for node in nodes:
        reason = why_not(pod, node)
        if reason:
            refused[node["metadata"]["name"]] = reason
        else:
            fitting.append(node)
    fitting.sort(key=lambda n: (pods_on.get(n["metadata"]["name"], 0), n["metadata"]["name"]))
    return (fitting[0] if fitting else None), refused


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
