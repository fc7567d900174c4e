"""The PodCheckpoint resource in the API (clients/kube.py holds PodMigration's; this reuses its
plumbing so the lead's file stays untouched)."""
from __future__ import annotations

from ..constants import CHECKPOINTS, GROUP, VERSION
from .kube import Kube, KubeError


async def get(kube: Kube, namespace: str, name: str) -> dict | None:
    return await kube._get(kube._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, CHECKPOINTS, name)


async def patch_status(kube: Kube, namespace: str, name: str, status: dict) -> None:
    """A merge patch of status; nothing when the PodCheckpoint is gone."""
    try:
        await kube._call(kube._custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
                         CHECKPOINTS, name, {"status": status}, _content_type="application/merge-patch+json")
    except KubeError as exc:
        if exc.status != 404:
            raise
