"""What a migration leaves for people to read: its status (phase, progress, conditions),
Events on the PodMigration and the pod, and the operator's metrics."""
from __future__ import annotations

import datetime
import logging
from typing import Any

from .. import metrics
from ..clients.kube import Kube, KubeError
from ..constants import FINAL, SUCCEEDED
from ..model import MigrationRef

log = logging.getLogger(__name__)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Recorder:
    """The PodMigration's status as last written, and the means to change it."""

    def __init__(self, kube: Kube, ref: MigrationRef, status: dict[str, Any] | None):
        self.kube, self.ref = kube, ref
        self.status: dict[str, Any] = dict(status or {})

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    async def update(self, **fields: Any) -> None:
        """Merge fields into the status (only what changed is sent); count a new phase."""
        changed = {k: v for k, v in fields.items() if self.status.get(k) != v}
        if not changed:
            return
        new_phase = changed.get("phase")
        self.status.update(changed)
        await self.kube.patch_migration_status(self.ref.namespace, self.ref.name, changed)
        if new_phase:
            metrics.entered(new_phase)
            if new_phase in FINAL and self.status.get("startTime"):
                metrics.DURATION.observe(_seconds_since(self.status["startTime"]))
            if new_phase == SUCCEEDED and self.status.get("downtimeMs") is not None:
                metrics.DOWNTIME.observe(self.status["downtimeMs"] / 1000)

    async def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        """Set one condition (kept once per type; the time changes only when its status does)."""
        conditions = [dict(c) for c in self.status.get("conditions") or []]
        value = "True" if status else "False"
        old = next((c for c in conditions if c["type"] == type_), None)
        entry = {"type": type_, "status": value, "reason": reason, "message": message,
                 "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == value else now()}
        if old == entry:
            return
        conditions = [c for c in conditions if c["type"] != type_] + [entry]
        await self.update(conditions=conditions)

    async def event(self, type_: str, reason: str, message: str, pod: dict | None = None) -> None:
        """An Event on the PodMigration and, when given, on the pod (a failed post is only logged)."""
        refs = [self.ref.object_ref()]
        if pod is not None:
            meta = pod["metadata"]
            refs.append({"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                         "namespace": meta["namespace"], "uid": meta["uid"]})
        for ref in refs:
            try:
                await self.kube.post_event(ref, type_, reason, message)
            except KubeError as exc:
                log.warning("could not post the %s event on %s %s: %s", reason, ref["kind"], ref["name"], exc)


def _seconds_since(stamp: str) -> float:
    start = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (datetime.datetime.now(datetime.timezone.utc) - start).total_seconds())
