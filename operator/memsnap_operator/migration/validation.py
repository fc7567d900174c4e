"""Checks before anything is touched: a refused migration ends Failed with the reason, and the
pod, the nodes and the cluster are as they were."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..clients.kube import Kube
from ..constants import FINAL, LOCK
from ..model import MigrationRef
from . import placement


class Refused(Exception):
    """The migration cannot run; the message says why, naming what is wrong."""


@dataclass(frozen=True)
class Plan:
    pod: dict[str, Any]
    source_node: str
    target_node: str


async def plan(kube: Kube, ref: MigrationRef) -> Plan:
    pod = await kube.get_pod(ref.namespace, ref.pod_name)
    if pod is None:
        raise Refused(f"pod {ref.namespace}/{ref.pod_name} does not exist")
    check_pod(pod)
    if ref.from_checkpoint:  # handlers route these to checkpoint/restore.py: never a live migration
        raise Refused(f"spec.fromCheckpoint ({ref.from_checkpoint}) is a restore, not a live migration")
    await check_not_held(kube, pod, ref)
    target = await _target(kube, pod, ref.target_node)
    await check_volumes(kube, pod, target)
    return Plan(pod, pod["spec"]["nodeName"], target["metadata"]["name"])


def check_pod(pod: dict) -> None:
    name, spec, status = pod["metadata"]["name"], pod["spec"], pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp"):
        raise Refused(f"pod {name} is being deleted")
    if status.get("phase") != "Running" or not spec.get("nodeName"):
        raise Refused(f"pod {name} is {status.get('phase', 'not running')}: only a running pod can be migrated")
    if spec.get("hostNetwork"):
        raise Refused(f"pod {name} uses hostNetwork: its network is its node's and cannot move")
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            raise Refused(f"pod {name} mounts the hostPath volume {volume['name']} "
                          f"({volume['hostPath'].get('path')}): a node's files do not move with a pod")


async def check_not_held(kube: Kube, pod: dict, ref: MigrationRef) -> None:
    """One migration per pod: the pod's lock annotation names the PodMigration that holds it."""
    holder = (pod["metadata"].get("annotations") or {}).get(LOCK)
    if not holder or holder == ref.name:
        return
    other = await kube.get_migration(ref.namespace, holder)
    if other is not None and (other.get("status") or {}).get("phase") not in FINAL:
        raise Refused(f"pod {ref.pod_name} is already being migrated by PodMigration {holder}")


async def _target(kube: Kube, pod: dict, wanted: str | None) -> dict:
    cluster = placement.Cluster(nodes={n["metadata"]["name"]: n for n in await kube.list_nodes()},
                                pods=await kube.list_pods(field_selector="status.phase!=Succeeded,status.phase!=Failed"))
    if wanted:
        node = cluster.nodes.get(wanted)
        if node is None:
            raise Refused(f"node {wanted} does not exist")
        reason = placement.why_not(pod, node, cluster)
        if reason:
            raise Refused(f"cannot migrate to {wanted}: {reason}")
        return node
    node, refused = placement.choose(pod, cluster)
    if node is None:
        why = "; ".join(f"{n}: {r.removeprefix(n + ' ')}" for n, r in sorted(refused.items())) or "no nodes"
        raise Refused(f"no node fits pod {pod['metadata']['name']}: {why}")
    return node


async def check_volumes(kube: Kube, pod: dict, target: dict) -> None:
    """A PVC must be mountable on the target while the source still holds it."""
    namespace, node = pod["metadata"]["namespace"], target["metadata"]["name"]
    for volume in pod["spec"].get("volumes") or []:
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if not claim:
            continue
        pvc = await kube.get_pvc(namespace, claim)
        if pvc is None:
            raise Refused(f"PVC {claim} (volume {volume['name']}) does not exist")
        if (pvc.get("status") or {}).get("phase") != "Bound":
            raise Refused(f"PVC {claim} is not bound")
        modes = set((pvc.get("status") or {}).get("accessModes") or pvc["spec"].get("accessModes") or [])
        if not modes & {"ReadWriteMany", "ReadOnlyMany"}:
            raise Refused(f"PVC {claim} is ReadWriteOnce: {node} cannot mount it while the pod holds it on "
                          f"{pod['spec']['nodeName']}")
        pv = await kube.get_pv(pvc["spec"].get("volumeName", ""))
        terms = ((((pv or {}).get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}) \
            .get("nodeSelectorTerms")
        if terms and not any(placement.term_matches(t, target) for t in terms):
            raise Refused(f"PVC {claim}: its volume {pv['metadata']['name']} is not reachable from {node} "
                          f"(its node affinity excludes it)")
