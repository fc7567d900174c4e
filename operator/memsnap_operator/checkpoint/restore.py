"""A PodMigration with spec.fromCheckpoint: the pod comes back on another node from the newest
checkpoint of a PodCheckpoint, for when its node died (no live source to pre-copy from).

The images must be on a live node: the pod's node keeps the checkpoints and its agent copies
each one to a peer node (status.node and status.replicaNode of the PodCheckpoint). The target
is a node holding them that is Ready and not the pod's node (spec.targetNode, if given, must be
one). Its agent stages the newest checkpoint (POST /api/v1/checkpoints/{id}/restore, as the
PodMigration's uid); the target pod (target_pod.build, as for a live migration) is restored by
memsnap-runc when its containers are created; once they run, the old pod object is deleted
(grace 0: its node may be gone) and the target takes its owner references. The old pod's
memory since that checkpoint is lost: this is a restore, not a migration.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

from ..clients.agents import AgentError
from ..clients.kube import KubeError
from ..constants import FAILED, FINAL, PENDING, RESTORING, SCHEDULING, SUCCEEDED
from ..migration import placement, target_pod
from ..migration.flow import Services, Stop
from ..migration.record import Recorder, now
from ..model import MigrationRef, target_pod_name

log = logging.getLogger(__name__)

RUN_WAIT = 150.0  # s for the target pod's containers to be restored and run


class Failure(Exception):
    pass


class FromCheckpoint:
    def __init__(self, services: Services, body: Mapping[str, Any]):
        self.kube, self.agents = services.kube, services.agents
        self.ref = MigrationRef.from_body(body)
        self.rec = Recorder(self.kube, self.ref, body.get("status"))
        self.target_name = target_pod_name(self.ref.pod_name, self.ref.short_id)

    async def run(self, stop: Stop) -> None:
        if self.rec.phase in FINAL:
            return
        await self.rec.update(phase=PENDING, startTime=self.rec.status.get("startTime") or now())
        try:
            await self._run(stop)
        except (Failure, AgentError, KubeError) as exc:
            await self._fail(str(exc))

    async def _run(self, stop: Stop) -> None:
        ns = self.ref.namespace
        ckpt = await self.kube.get_checkpoint(ns, self.ref.from_checkpoint)
        if ckpt is None:
            raise Failure(f"PodCheckpoint {ns}/{self.ref.from_checkpoint} does not exist")
        if (ckpt.get("spec") or {}).get("podName") != self.ref.pod_name:
            raise Failure(f"PodCheckpoint {self.ref.from_checkpoint} checkpoints pod "
                          f"{(ckpt.get('spec') or {}).get('podName')}, not {self.ref.pod_name}")
        status = ckpt.get("status") or {}
        if not status.get("checkpoints"):
            raise Failure(f"PodCheckpoint {self.ref.from_checkpoint} has no checkpoint yet")
        source = await self.kube.get_pod(ns, self.ref.pod_name)
        if source is None:
            raise Failure(f"pod {ns}/{self.ref.pod_name} does not exist: its spec is what the restored pod runs")
        source_node = source["spec"].get("nodeName", "")
        target = await self._target(status, source_node)
        await self.rec.update(phase=SCHEDULING, sourceNode=source_node, targetNode=target, targetPod=self.target_name)
        pod = await self.kube.get_pod(ns, self.target_name)
        if not target_pod.is_target_of(pod, self.ref):  # else resumed after an operator restart
            address = placement.internal_ip(await self.kube.get_node(target) or {}) or ""
            staged = await self.agents.restore_checkpoint(target, address, ckpt["metadata"]["uid"], self.ref.uid)
            await self.rec.update(phase=RESTORING, message=f"restoring checkpoint {staged['checkpoint']} on {target}")
            pod = await self.kube.create_pod(ns, target_pod.build(source, name=self.target_name, node=target,
                                                                  migration=self.ref))
        await self._wait_running(stop)
        await self.kube.delete_pod(ns, self.ref.pod_name, uid=source["metadata"]["uid"], grace_seconds=0)
        pod = await self.kube.get_pod(ns, self.target_name) or pod
        if target_pod.OWNERS in (pod["metadata"].get("annotations") or {}):
            pod = await self.kube.patch_pod(ns, self.target_name, target_pod.adopt_patch(pod))
        message = (f"{self.ref.pod_name} was restored on {target} as {self.target_name} from PodCheckpoint "
                   f"{self.ref.from_checkpoint} ({status.get('lastCheckpointTime')})")
        await self.rec.update(phase=SUCCEEDED, completionTime=now(), message=message)
        await self.rec.event("Normal", "RestoredFromCheckpoint", message, pod=pod)

    async def _target(self, status: dict, source_node: str) -> str:
        holders = [n for n in (status.get("replicaNode"), status.get("node")) if n and n != source_node]
        if self.ref.target_node:
            if self.ref.target_node not in holders:
                raise Failure(f"node {self.ref.target_node} holds no copy of PodCheckpoint "
                              f"{self.ref.from_checkpoint} (held on: {', '.join(holders) or 'only the pod node'})")
            holders = [self.ref.target_node]
        for name in holders:
            node = await self.kube.get_node(name)
            if node is not None and placement.ready(node):
                return name
        raise Failure(f"no Ready node other than {source_node} holds PodCheckpoint {self.ref.from_checkpoint}'s "
                      f"checkpoints (it keeps them on {status.get('node')} and {status.get('replicaNode') or 'no peer'})")

    async def _wait_running(self, stop: Stop) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RUN_WAIT
        while True:
            pod = await self.kube.get_pod(self.ref.namespace, self.target_name)
            if pod is None:
                raise Failure(f"the target pod {self.target_name} is gone")
            statuses = (pod.get("status") or {}).get("containerStatuses") or []
            if statuses and all("running" in (s.get("state") or {}) for s in statuses):
                return
            for s in statuses:
                if (s.get("restartCount") or 0) > 0 or "terminated" in (s.get("lastState") or {}):
                    raise Failure(f"the restore of container {s['name']} on the target failed: "
                                  f"{(s.get('lastState') or {}).get('terminated', {}).get('message', 'it exited')}")
            if loop.time() > deadline:
                raise Failure(f"the target pod's containers did not run within {RUN_WAIT:.0f} s")
            if await stop.sleep(1.0):
                raise Failure("the operator is stopping")  # resumed from the target pod's state next time

    async def _fail(self, reason: str) -> None:
        log.warning("PodMigration %s/%s from checkpoint failed: %s", self.ref.namespace, self.ref.name, reason)
        pod = await self.kube.get_pod(self.ref.namespace, self.target_name)
        if target_pod.is_target_of(pod, self.ref):
            await self.kube.delete_pod(self.ref.namespace, self.target_name, grace_seconds=0)
        await self.rec.update(phase=FAILED, completionTime=now(), message=reason)
        await self.rec.event("Warning", "FailedRestore", reason)

    async def deleted(self) -> None:
        if self.rec.phase is not None and self.rec.phase not in FINAL:
            await self._fail("the PodMigration was deleted before the restore finished")
