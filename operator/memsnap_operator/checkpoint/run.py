"""One PodCheckpoint's life: every spec.schedule interval the pod's node's agent takes a
checkpoint (incremental, pruned to spec.retention); status lists what the node keeps. A
failure is a Warning Event and status.message; the pod and the earlier checkpoints are left
alone (the agent guarantees it) and the next interval tries again. Deleting the PodCheckpoint
removes its images (the finalizer waits for the agent, a few tries)."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Protocol

from ..clients.agents import AgentError
from ..clients.kube import KubeError
from ..constants import GROUP, VERSION
from ..migration.flow import Services
from ..migration.placement import internal_ip, ready
from . import schedule

log = logging.getLogger(__name__)

DEFAULT_PATH = "/var/lib/memsnap/checkpoints"
ACTIVE, FAILED = "Active", "Failed"


class Stop(Protocol):
    def is_set(self) -> bool: ...
    async def sleep(self, seconds: float) -> bool: ...


class Refused(Exception):
    """The spec asks for what cannot be done; the message says what and why."""


class Checkpointing:
    def __init__(self, services: Services, body: Mapping[str, Any]):
        self.kube, self.agents = services.kube, services.agents
        meta, spec = body["metadata"], body.get("spec") or {}
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.spec = spec
        self.status: dict[str, Any] = dict(body.get("status") or {})

    @property
    def ref(self) -> dict[str, str]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PodCheckpoint", "name": self.name,
                "namespace": self.namespace, "uid": self.uid}

    # ---- the schedule ----------------------------------------------------------------------

    async def run(self, stop: Stop) -> None:
        try:
            interval = schedule.interval_seconds(self.spec.get("schedule", ""))
            _check_storage(self.spec.get("storage") or {})
        except (ValueError, Refused) as exc:
            await self._failed("Refused", str(exc))
            return  # a spec change restarts the daemon
        while not stop.is_set():
            wait = schedule.seconds_until_due(self.status.get("lastCheckpointTime"), interval)
            if wait > 0 and await stop.sleep(wait):
                return
            attempted = schedule.now()
            await self.take_one()
            if self.status.get("phase") == FAILED:  # no tight loop on failures: the next interval
                self.status["lastAttemptTime"] = schedule.stamp(attempted)
                if await stop.sleep(interval):
                    return

    async def take_one(self) -> None:
        try:
            pod = await self.kube.get_pod(self.namespace, self.spec["podName"])
            if pod is None:
                raise Refused(f"pod {self.namespace}/{self.spec['podName']} does not exist")
            node = (pod.get("spec") or {}).get("nodeName")
            if not node or (pod.get("status") or {}).get("phase") != "Running":
                raise Refused(f"pod {self.namespace}/{self.spec['podName']} is not running on a node")
            address = await self._address(node)
            request = {"pod": {"namespace": self.namespace, "name": pod["metadata"]["name"],
                               "uid": pod["metadata"]["uid"]},
                       "id": self.uid, "retention": int(self.spec.get("retention", 3))}
            peer = await self._peer(node)
            if peer:
                request["replicateTo"] = peer
            taken = await self.agents.checkpoint(node, address, request)
            kept = await self.agents.checkpoints(node, address, self.uid)
        except (Refused, AgentError, KubeError) as exc:
            await self._failed("CheckpointFailed", str(exc))
            return
        replica = taken.get("replica") or {}
        message = (f"checkpoint {taken['name']} on {node}: {taken['size']} bytes, {taken['layers']} layer(s), "
                   f"the pod stood still {taken.get('pauseMs', '?')} ms")
        if replica.get("ok"):
            message += f"; copied to {replica['node']}"
        elif replica:
            message += f"; NOT copied to {replica.get('node')}: {replica.get('error')}"
            await self.kube.post_event(self.ref, "Warning", "ReplicationFailed", message)
        status = {"phase": ACTIVE, "node": node, "lastCheckpointTime": taken["time"],
                  "checkpoints": [{k: c[k] for k in ("name", "time", "size", "layers") if k in c} for c in kept],
                  "message": message,
                  "conditions": [_condition("True", "CheckpointTaken", f"checkpoint {taken['name']} on {node}")]}
        if replica.get("ok"):
            status["replicaNode"] = replica["node"]
        self.status.update(status)
        await self.kube.patch_checkpoint_status(self.namespace, self.name, status)

    async def _failed(self, reason: str, message: str) -> None:
        log.warning("PodCheckpoint %s/%s: %s", self.namespace, self.name, message)
        status = {"phase": FAILED, "message": message, "conditions": [_condition("False", reason, message)]}
        self.status.update(status)
        try:
            await self.kube.patch_checkpoint_status(self.namespace, self.name, status)
            await self.kube.post_event(self.ref, "Warning", reason, message)
        except KubeError as exc:
            log.error("PodCheckpoint %s/%s: could not record the failure: %s", self.namespace, self.name, exc)

    # ---- deletion --------------------------------------------------------------------------

    async def _peer(self, node: str) -> str | None:
        """Where the checkpoints are copied: the peer of the last time while it is Ready, else
        the first Ready, schedulable node other than the pod's (by name)."""
        candidates = [n for n in await self.kube.list_nodes()
                      if n["metadata"]["name"] != node and ready(n) and not (n.get("spec") or {}).get("unschedulable")]
        names = sorted(n["metadata"]["name"] for n in candidates)
        previous = self.status.get("replicaNode")
        return previous if previous in names else (names[0] if names else None)

    async def deleted(self) -> str:
        """Remove the images on the nodes that hold them; raises AgentError when it cannot
        (the caller retries, then lets go and says so)."""
        said = []
        for node in dict.fromkeys(n for n in (self.status.get("node"), self.status.get("replicaNode")) if n):
            removed = await self.agents.delete_checkpoints(node, await self._address(node), self.uid)
            said.append(f"checkpoints on {node} removed" if removed else f"no checkpoints left on {node}")
        return "; ".join(said) or "no checkpoint was taken: nothing to remove"

    async def _address(self, node: str) -> str:
        obj = await self.kube.get_node(node)
        address = internal_ip(obj) if obj else None
        if not address:
            raise AgentError(f"node {node} has no InternalIP to reach its agent at")
        return address


def _check_storage(storage: Mapping[str, Any]) -> None:
    if storage.get("type", "NodeLocal") != "NodeLocal":
        raise Refused("spec.storage.type PVC is not implemented yet: checkpoints are kept on the pod's node "
                      "(NodeLocal)")
    if storage.get("path", DEFAULT_PATH).rstrip("/") != DEFAULT_PATH:
        raise Refused(f"spec.storage.path {storage.get('path')!r}: the agent keeps checkpoints only under "
                      f"{DEFAULT_PATH} (root-only, where it can guarantee 0700)")


def _condition(status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": "Ready", "status": status, "reason": reason, "message": message[:1024],
            "lastTransitionTime": schedule.stamp(schedule.now())}
