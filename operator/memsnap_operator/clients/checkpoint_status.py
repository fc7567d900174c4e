"""The PodCheckpoint resource in the API (clients/kube.py holds PodMigration's; this reuses its
REST plumbing so the lead's file stays untouched)."""
from __future__ import annotations

from ..constants import CHECKPOINTS
from .kube import MERGE, Kube, KubeError, _custom


async def get(kube: Kube, namespace: str, name: str) -> dict | None:
    return await kube._get(_custom(namespace, CHECKPOINTS, name))


async def patch_status(kube: Kube, namespace: str, name: str, status: dict) -> None:
    """A merge patch of status; nothing when the PodCheckpoint is gone."""
    try:
        await kube._call("PATCH", _custom(namespace, CHECKPOINTS, name) + "/status", {"status": status},
                         content_type=MERGE)
    except KubeError as exc:
        if exc.status != 404:
            raise
