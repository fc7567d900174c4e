"""The target pod: the source pod's spec pinned to the target node, restored instead of started.

Owner references and ReplicaSets: a ReplicaSet counts the active pods that match its selector
and name it as their controller, and deletes the surplus, newest and least ready first. A
target pod created with the source's labels *and* its controller reference would be that
surplus, and deleted mid-migration. So until the hand-over the target's controller is the
PodMigration (the ReplicaSet leaves pods controlled by someone else alone, and the garbage
collector removes the target with its PodMigration); the source's owner references ride along
in an annotation, and the target takes them at the hand-over (adopt_patch()). There the
ReplicaSet must see neither no pod (it would start a replacement: a second copy of the workload)
nor two ready ones (it would delete the newer, the target). It deletes a not-ready surplus pod
first, so the flow marks the source not ready (moved_away()), then the target is adopted, then
the source is deleted: at every step the ReplicaSet counts one pod, or two of which the source
goes first.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any

from ..constants import LOCK, MIGRATED_FROM, RESTORE_FROM, RUNTIME_CLASS
from ..model import MigrationRef
from .record import now

OWNERS = "memsnap.io/owner-references"  # the source pod's ownerReferences, until adopt()
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Metadata the API server owns, and spec that belongs to the old pod only.
_DROP_META = ("uid", "resourceVersion", "creationTimestamp", "selfLink", "managedFields", "generateName",
              "deletionTimestamp", "deletionGracePeriodSeconds", "generation")


def build(source: dict, *, name: str, node: str, migration: MigrationRef) -> dict[str, Any]:
    meta = {k: v for k, v in copy.deepcopy(source["metadata"]).items() if k not in _DROP_META}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LOCK}
    annotations.update({RESTORE_FROM: migration.uid, MIGRATED_FROM: source["metadata"]["name"],
                        OWNERS: json.dumps(source["metadata"].get("ownerReferences") or [])})
    ref = migration.object_ref()
    owner = {k: ref[k] for k in ("apiVersion", "kind", "name", "uid")}
    meta.update(name=name, annotations=annotations,
                ownerReferences=[{**owner, "controller": True, "blockOwnerDeletion": False}])
    spec = copy.deepcopy(source["spec"])
    spec["nodeName"] = node
    spec["runtimeClassName"] = RUNTIME_CLASS
    # Init containers already did their work on the source; what they left in emptyDirs moves
    # with the pod. Running them again would start what the migration is carrying over.
    spec.pop("initContainers", None)
    spec.pop("ephemeralContainers", None)
    # The workload keeps the hostname it had (a pod's hostname is its name unless set).
    if not spec.get("hostname") and _LABEL.fullmatch(source["metadata"]["name"]):
        spec["hostname"] = source["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def is_target_of(pod: dict | None, migration: MigrationRef) -> bool:
    return bool(pod) and (pod["metadata"].get("annotations") or {}).get(RESTORE_FROM) == migration.uid


def adopt_patch(target: dict) -> dict[str, Any]:
    """Give the target the source's owner references (a merge patch replaces the list)."""
    owners = json.loads((target["metadata"].get("annotations") or {}).get(OWNERS) or "[]")
    return {"metadata": {"ownerReferences": owners or None, "annotations": {OWNERS: None}}}


def is_ready(pod: dict) -> bool:
    """Ready as a ReplicaSet judges it: the pod's Ready condition is True."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def moved_away(target_name: str) -> dict[str, Any]:
    """The source pod's Ready condition once its workload runs in the target pod."""
    return {"type": "Ready", "status": "False", "reason": "MigratedAway", "lastTransitionTime": now(),
            "message": f"the workload moved to pod {target_name}; this pod is frozen and about to be deleted"}
