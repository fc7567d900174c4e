"""One PodMigration, start to end, as steps that resume from the phase recorded in its status:
an operator restarted at any point picks up where the last one was (the steps are idempotent),
and any failure rolls back: the source runs on, the target pod goes, the pod is free again.

    Pending     check (nothing touched if refused: Failed), lock the pod, choose the target
    Scheduling  create the target pod, wait for its sandbox (PreparingTarget -> TargetReady),
                start the migration on the source node's agent
    PreCopying, Finalizing, Restoring   follow the agent
    hand-over   the agent says HandedOver: the target takes the source pod's owners, the source
                pod is deleted, the agent ends the frozen source copy -> Succeeded
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from ..clients.agents import AgentError, Agents
from ..clients.kube import Kube, KubeError
from ..config import OperatorConfig
from ..constants import (AGENT_RUNNING, FAILED, FINAL, FINALIZING, LOCK, PENDING, PRECOPYING, RESTORING,
                         ROLLED_BACK, SCHEDULING, SUCCEEDED)
from ..model import MigrationRef, target_pod_name
from . import placement, target_pod, validation
from .record import Recorder, now

log = logging.getLogger(__name__)

SOURCE_UID = "memsnap.io/migrated-from-uid"  # on the target pod: which pod it replaces
HANDED = ("HandedOver", "Completed")
AGENT_ENDED = ("Failed", "RolledBack")
SANDBOX_FAILED = ("FailedCreatePodSandBox",)
SANDBOX_UP = ("Pulled", "Created", "Started")  # the kubelet got past the sandbox to the containers


class Stopped(Exception):
    """The operator is stopping or the PodMigration is being deleted: leave, undo nothing here."""


class Failure(Exception):
    """Roll back, for this reason."""

    def __init__(self, reason: str, agent_done: bool = False):
        super().__init__(reason)
        self.agent_done = agent_done  # the agent already rolled its half back


class Stop(Protocol):
    def is_set(self) -> bool: ...
    async def sleep(self, seconds: float) -> bool: ...  # True: stop was asked meanwhile


@dataclass(frozen=True)
class Services:
    kube: Kube
    agents: Agents
    config: OperatorConfig


class Migration:
    def __init__(self, services: Services, body: dict[str, Any]):
        self.kube, self.agents, self.config = services.kube, services.agents, services.config
        self.ref = MigrationRef.from_body(body)
        self.rec = Recorder(self.kube, self.ref, body.get("status"))

    # ---- the flow --------------------------------------------------------------------------

    async def run(self, stop: Stop) -> None:
        if self.rec.phase in FINAL:
            return
        try:
            if self.rec.phase in (None, PENDING) and not await self._plan():
                return
            if self.rec.phase == SCHEDULING:
                await self._prepare_target(stop)
                await self._start_agent()
            await self._follow(stop)
        except Stopped:
            log.info("%s/%s: stopping in phase %s; a later run resumes", self.ref.namespace, self.ref.name,
                     self.rec.phase)
        except Failure as exc:
            await self.roll_back(str(exc), agent_done=exc.agent_done)
        except (KubeError, AgentError, OSError, ValueError, KeyError) as exc:
            log.exception("migration %s/%s failed", self.ref.namespace, self.ref.name)
            await self.roll_back(f"operator error: {type(exc).__name__}: {exc}")

    async def deleted(self) -> None:
        """The PodMigration is being deleted: a migration in flight rolls back first."""
        if self.rec.phase is not None and self.rec.phase not in FINAL:  # None: never started
            await self.roll_back("the PodMigration was deleted before the migration finished")

    async def _plan(self) -> bool:
        await self.rec.update(phase=PENDING, startTime=self.rec.status.get("startTime") or now())
        for _ in range(3):  # a lost race for the pod's lock: check again
            try:
                plan = await validation.plan(self.kube, self.ref)
            except validation.Refused as exc:
                await self._refuse(str(exc))
                return False
            if await self._lock(plan.pod):
                break
        else:
            await self._refuse(f"pod {self.ref.pod_name} keeps changing; could not take it for the migration")
            return False
        target = target_pod_name(self.ref.pod_name, self.ref.short_id)
        await self.rec.update(phase=SCHEDULING, sourceNode=plan.source_node, targetNode=plan.target_node,
                              targetPod=target,
                              message=f"moving {self.ref.pod_name} from {plan.source_node} to {plan.target_node}")
        await self.rec.event("Normal", "Migrating", f"moving pod {self.ref.pod_name} from {plan.source_node} to "
                             f"{plan.target_node} as {target}", pod=plan.pod)
        return True

    async def _lock(self, pod: dict) -> bool:
        """Annotate the pod as held by this migration, unless it changed since it was read."""
        meta = pod["metadata"]
        if (meta.get("annotations") or {}).get(LOCK) == self.ref.name:
            return True
        try:
            await self.kube.patch_pod(self.ref.namespace, meta["name"], {"metadata": {
                "resourceVersion": meta["resourceVersion"], "annotations": {LOCK: self.ref.name}}})
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise

    async def _source(self) -> dict | None:
        """The source pod: the pod of that name this migration holds."""
        pod = await self.kube.get_pod(self.ref.namespace, self.ref.pod_name)
        held = pod and (pod["metadata"].get("annotations") or {}).get(LOCK) == self.ref.name
        return pod if held and not pod["metadata"].get("deletionTimestamp") else None

    async def _prepare_target(self, stop: Stop) -> None:
        name, node = self.rec.status["targetPod"], self.rec.status["targetNode"]
        target = await self.kube.get_pod(self.ref.namespace, name)
        if not target_pod.is_target_of(target, self.ref):
            if target is not None:
                raise Failure(f"a pod named {name} exists already and is not this migration's target")
            source = await self._source()
            if source is None:
                raise Failure(f"the source pod {self.ref.pod_name} is gone")
            await self.rec.condition("TargetReady", False, "PreparingTarget", f"creating {name} on {node}")
            manifest = target_pod.build(source, name=name, node=node, migration=self.ref)
            manifest["metadata"]["annotations"][SOURCE_UID] = source["metadata"]["uid"]
            try:
                target = await self.kube.create_pod(self.ref.namespace, manifest)
            except KubeError as exc:
                raise Failure(f"cannot create the target pod {name}: {exc}") from None
        await self._wait_sandbox(stop, target)
        await self.rec.condition("TargetReady", True, "TargetReady", f"{name} has its sandbox on {node}")

    async def _wait_sandbox(self, stop: Stop, target: dict) -> None:
        name, node = target["metadata"]["name"], self.rec.status["targetNode"]
        timeout = self.config.target_ready_timeout
        deadline = time.monotonic() + timeout
        while True:
            pod = await self.kube.get_pod(self.ref.namespace, name)
            if not target_pod.is_target_of(pod, self.ref):
                raise Failure(f"the target pod {name} was deleted")
            status = pod.get("status") or {}
            if status.get("phase") in ("Failed", "Succeeded"):
                raise Failure(f"the target pod {name} ended ({status['phase']}: "
                              f"{status.get('reason', '')} {status.get('message', '')})".rstrip())
            if status.get("podIP"):
                return
            for event in await self.kube.events_of(self.ref.namespace, pod["metadata"]["uid"]):
                if event.get("reason") in SANDBOX_FAILED:
                    raise Failure(f"{node} cannot start the target pod {name}: {event.get('message', '')}")
                if event.get("reason") in SANDBOX_UP:
                    return
            if time.monotonic() > deadline:
                raise Failure(f"the target pod {name} got no sandbox on {node} within {timeout:.0f} s")
            if await stop.sleep(0.5):
                raise Stopped()

    async def _start_agent(self) -> None:
        node, source = self.rec.status["sourceNode"], await self._source()
        if source is None:
            raise Failure(f"the source pod {self.ref.pod_name} is gone")
        request = {"pod": {"namespace": self.ref.namespace, "name": self.ref.pod_name,
                           "uid": source["metadata"]["uid"]},
                   "id": self.ref.uid, "to": self.rec.status["targetNode"],
                   "targetPod": {"namespace": self.ref.namespace, "name": self.rec.status["targetPod"]},
                   **self.ref.policy.agent_fields()}
        try:
            await self.agents.start(node, await self._address(node), request)
        except AgentError as exc:
            if exc.status != 409:  # 409: it runs already (started before an operator restart)
                # An answer, or no connection at all: nothing started there. A lost answer: abort.
                never_started = exc.status is not None or isinstance(exc.__cause__, aiohttp.ClientConnectorError)
                raise Failure(f"the agent of {node} did not start the migration: {exc}",
                              agent_done=never_started) from None
        await self.rec.update(phase=PRECOPYING, message=f"pre-copying {self.ref.pod_name} to "
                              f"{self.rec.status['targetNode']}")

    async def _follow(self, stop: Stop) -> None:
        node = self.rec.status["sourceNode"]
        address = await self._address(node)
        answered, polls = time.monotonic(), 0
        while True:
            try:
                info = await self.agents.get(node, address, self.ref.uid)
            except AgentError as exc:
                if exc.status == 404:
                    raise Failure(f"the agent of {node} no longer knows this migration: {exc}") from None
                if time.monotonic() - answered > self.config.agent_silence:
                    raise Failure(f"the agent of {node} stopped answering: {exc}") from None
            else:
                answered = time.monotonic()
                phase = info.get("phase")
                if phase in HANDED:
                    await self._hand_over(info)
                    return
                if phase in AGENT_ENDED:
                    raise Failure(f"the agent of {node} rolled the migration back: "
                                  f"{info.get('message') or phase}", agent_done=True)
                await self.rec.update(phase=AGENT_RUNNING.get(phase, self.rec.phase), **_progress(info))
            polls += 1
            if polls % 5 == 0 and await self._source() is None:
                raise Failure(f"the source pod {self.ref.pod_name} was deleted during the migration")
            if await stop.sleep(self.config.poll_interval):
                raise Stopped()

    async def _hand_over(self, info: dict) -> None:
        """The target's containers run and the source's are frozen: the source pod goes, the target
        takes its owners, and the agent ends the frozen copy."""
        node, name = self.rec.status["sourceNode"], self.rec.status["targetPod"]
        target = await self.kube.get_pod(self.ref.namespace, name)
        if not target_pod.is_target_of(target, self.ref):
            raise Failure(f"the target pod {name} is gone at the hand-over")
        if target_pod.OWNERS in (target["metadata"].get("annotations") or {}):
            target = await self._give_owners(target)
        else:
            await self._delete_source(target)
        address = await self._address(node)
        final = info
        for attempt in range(5):
            try:
                final = await self.agents.complete(node, address, self.ref.uid)
                break
            except AgentError as exc:
                if exc.status in (404, 409):
                    break
                log.warning("complete on %s: %s (attempt %d)", node, exc, attempt + 1)
                await asyncio.sleep(1.0)
        try:
            final = await self.agents.get(node, address, self.ref.uid)
        except AgentError as exc:  # the agent ends the source copy itself 60 s after the hand-over
            log.warning("reading the result from %s: %s", node, exc)
        fields = _progress({**info, **final})
        message = f"{self.ref.pod_name} now runs on {self.rec.status['targetNode']} as {name}"
        if fields.get("downtimeMs") is not None:
            message += f"; paused {fields['downtimeMs']} ms"
        await self.rec.update(**fields, phase=SUCCEEDED, completionTime=now(), message=message)
        await self.rec.condition("TargetReady", True, "HandedOver", message)
        await self.rec.event("Normal", "SuccessfulMigration", message, pod=target)

    async def _give_owners(self, target: dict) -> dict:
        """The source's controller (a ReplicaSet) must never count no pod, or it starts a second
        copy of the workload, nor two ready ones, or it deletes the newer: the target. It deletes a
        not-ready surplus pod before a ready one, so: the target ready, the source marked not
        ready, the target adopted, and only then the source deleted."""
        name = target["metadata"]["name"]
        ready = await self._wait_ready(name)
        if ready is None:  # adopted now, the target would be the surplus: the source goes first
            log.warning("%s/%s: %s is not ready; deleting the source before the adoption, its controller may "
                        "start a replacement and delete it again", self.ref.namespace, self.ref.name, name)
            await self._delete_source(target)
            return await self.kube.patch_pod(self.ref.namespace, name, target_pod.adopt_patch(target))
        source = await self.kube.get_pod(self.ref.namespace, self.ref.pod_name)
        if _same_pod(source, target) and not source["metadata"].get("deletionTimestamp"):
            await self.kube.set_pod_condition(self.ref.namespace, self.ref.pod_name, target_pod.moved_away(name))
        adopted = await self.kube.patch_pod(self.ref.namespace, name, target_pod.adopt_patch(ready))
        await self._delete_source(target)
        return adopted

    async def _wait_ready(self, name: str) -> dict | None:
        """The target pod once its kubelet reports it Ready; None if it is not within the bound."""
        deadline = time.monotonic() + self.config.target_ready_timeout
        while time.monotonic() < deadline:
            pod = await self.kube.get_pod(self.ref.namespace, name)
            if not target_pod.is_target_of(pod, self.ref):
                raise Failure(f"the target pod {name} is gone at the hand-over")
            if target_pod.is_ready(pod):
                return pod
            await asyncio.sleep(0.2)
        return None

    async def _delete_source(self, target: dict) -> None:
        uid = (target["metadata"].get("annotations") or {}).get(SOURCE_UID)
        await self.kube.delete_pod(self.ref.namespace, self.ref.pod_name, uid=uid, grace_seconds=0)

    # ---- failures --------------------------------------------------------------------------

    async def _refuse(self, reason: str) -> None:
        await self.rec.update(phase=FAILED, completionTime=now(), message=reason)
        pod = await self.kube.get_pod(self.ref.namespace, self.ref.pod_name)
        await self.rec.event("Warning", "FailedMigration", reason, pod=pod)

    async def roll_back(self, reason: str, agent_done: bool = False) -> None:
        """Undo what this migration did, in the order that keeps one copy running: the agent's
        half first (the source thaws), then the target pod, then the pod's lock."""
        notes = []
        if self.rec.phase in (SCHEDULING, PRECOPYING, FINALIZING, RESTORING) and not agent_done:
            note = await self._abort_agent()
            if note == "handed-over":
                return
            if note:
                notes.append(note)
        name = self.rec.status.get("targetPod")
        if name:
            target = await self.kube.get_pod(self.ref.namespace, name)
            if target_pod.is_target_of(target, self.ref):
                await self.kube.delete_pod(self.ref.namespace, name, uid=target["metadata"]["uid"], grace_seconds=0)
        source = await self.kube.get_pod(self.ref.namespace, self.ref.pod_name)
        if source and (source["metadata"].get("annotations") or {}).get(LOCK) == self.ref.name:
            await self.kube.patch_pod(self.ref.namespace, self.ref.pod_name,
                                      {"metadata": {"annotations": {LOCK: None}}})
        message = " ".join([f"rolled back: {reason}", *notes])
        await self.rec.update(phase=ROLLED_BACK, completionTime=now(), message=message)
        await self.rec.event("Warning", "FailedMigration", message, pod=source)

    async def _abort_agent(self) -> str:
        """Ask the source agent to roll back; "handed-over" when it is too late for that (the
        migration is then completed instead), else a note on what could not be confirmed."""
        node = self.rec.status.get("sourceNode")
        if not node:
            return ""
        try:
            address = await self._address(node)
            info = await self.agents.get(node, address, self.ref.uid)
        except (AgentError, Failure):
            info = {}
        if info.get("phase") in HANDED:
            await self._hand_over(info)
            return "handed-over"
        last: Exception | None = None
        for _ in range(3):
            try:
                await self.agents.abort(node, await self._address(node), self.ref.uid)
                return ""
            except AgentError as exc:
                if exc.status == 409:  # handed over meanwhile: the target holds the pod now
                    info = await self.agents.get(node, await self._address(node), self.ref.uid)
                    if info.get("phase") in HANDED:
                        await self._hand_over(info)
                        return "handed-over"
                last = exc
            except Failure as exc:
                last = exc
            await asyncio.sleep(2.0)
        return (f"(the agent of {node} did not confirm the abort: {last}; the agents' own timeouts end "
                f"their halves)")

    async def _address(self, node: str) -> str:
        obj = await self.kube.get_node(node)
        address = placement.internal_ip(obj) if obj else None
        if not address:
            raise Failure(f"node {node} has no InternalIP to reach its agent at")
        return address


def _progress(info: dict) -> dict[str, Any]:
    """The agent's progress in the PodMigration's status names (what it did not say is left out)."""
    names = {"iterations": "iterations", "transferredBytes": "transferredBytes", "remainingBytes": "remainingBytes",
             "dirtyRate": "dirtyRate", "predictedDowntimeMs": "predictedDowntimeMs", "downtimeMs": "downtimeMs"}
    out: dict[str, Any] = {}
    for key, field in names.items():
        value = info.get(key)
        if value is None:
            continue
        out[field] = float(value) if field == "dirtyRate" else int(value)
    return out


def _same_pod(source: dict | None, target: dict) -> bool:
    """The pod of the source's name is the one the target replaces (not a newer one of that name)."""
    return bool(source) and source["metadata"]["uid"] == (target["metadata"].get("annotations") or {}).get(SOURCE_UID)
