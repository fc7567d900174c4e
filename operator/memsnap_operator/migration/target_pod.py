"""The target pod: the source pod's spec pinned to the target node, restored instead of started.

Owner references and ReplicaSets: a ReplicaSet counts the active pods that match its selector
and name it as their controller, and deletes the surplus, newest and least ready first. A
target pod created with the source's labels *and* its controller reference would be that
surplus, and deleted mid-migration. So until the hand-over the target's controller is the
PodMigration (the ReplicaSet leaves pods controlled by someone else alone, and the garbage
collector removes the target with its PodMigration); the source's owner references ride along
in an annotation. At the hand-over the source pod is deleted first and the target then gets
them back (adopt()). Between those two calls the ReplicaSet may see no pod and start a
replacement; once it sees the target again it deletes that replacement itself (newer, not
ready), so the count settles at the one migrated pod.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any

from ..constants import LOCK, MIGRATED_FROM, RESTORE_FROM, RUNTIME_CLASS
from ..model import MigrationRef

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
