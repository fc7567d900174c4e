"""The source half of a pod migration (the operator's engine): every app container of a pod
on this node moves to a target pod on another node, which kubelet created there through
RuntimeClass memsnap and whose containers memsnap-runc restores at `create`.

    PreCopying  -> the target is told which containers come; (pre-copy rounds)
    Finalizing  -> the pod's freezer cgroup is frozen (all its containers stop together),
                   `runc checkpoint --leave-running` of each container, each sent
    Restoring   -> the target's agent marks the images ready; the target's wrapper restores
                   them when kubelet creates the containers; the target confirms they run
    HandedOver  -> the target holds the pod (committed); the source's copy stays frozen until
                   the caller deletes the source pod and calls complete (or COMPLETE_WAIT)
    Completed   -> the source's processes got SIGKILL while frozen, then the thaw: no user
                   code of theirs ran again
    RolledBack  -> any failure (or DELETE) before HandedOver: the source thawed and running,
                   nothing left on the target; Failed: what could not even be rolled back

It runs in the background: the API answers at once and reports status() when asked.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .. import cgroupfs
from ..images.layer import LayerWriter, Manifest
from . import podruntime, transfer
from .planner import Policy
from .podruntime import PodContainer
from .source import OUTGOING, MigrationError, _call

log = logging.getLogger(__name__)

COMPLETE_WAIT = 60.0  # s after HandedOver: then the source ends its copy itself
RESTORE_WAIT = 150.0  # s for the target's containers to be restored (kubelet's create included)
POLL = 0.1
PHASES = ("PreCopying", "Finalizing", "Restoring", "HandedOver", "Completed", "Failed", "RolledBack")
ENDED = ("Completed", "Failed", "RolledBack")


@dataclass
class PodRequest:
    id: str
    namespace: str
    name: str
    uid: str
    target: str  # node name
    port: int
    policy: Policy
    target_pod: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"https://{self.target}:{self.port}/api/v1/incoming/{self.id}"

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodMigration:
    def __init__(self, req: PodRequest, node: str, containers: list[PodContainer], session: aiohttp.ClientSession):
        self.req, self.node, self.containers, self.session = req, node, containers, session
        self.out = OUTGOING / req.id
        self.phase = "PreCopying"
        self.message = ""
        self.iterations = 0
        self.transferred = 0
        self.remaining = 0
        self.downtime_ms: float | None = None
        self.pause_phases: dict[str, float] = {}
        self.freezers: list[cgroupfs.Freezer] = []  # the containers', once we froze them
        self.created_on_target = False
        self.aborted = ""  # why DELETE asked to stop
        self.completed = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.limiter = transfer.RateLimiter(req.policy.bandwidth_bytes_s)
        self.cgroups = [p for c in containers for p in podruntime.container_cgroups(c)]  # to end them
        self.frozen_at = 0.0

    def status(self) -> dict:
        return {"id": self.req.id, "phase": self.phase, "iterations": self.iterations,
                "transferredBytes": self.transferred, "remainingBytes": self.remaining,
                "dirtyRate": 0, "predictedDowntimeMs": None, "downtimeMs": self.downtime_ms,
                "message": self.message, "sourceNode": self.node, "targetNode": self.req.target,
                "pod": {"namespace": self.req.namespace, "name": self.req.name, "uid": self.req.uid},
                "containers": [c.name for c in self.containers], "pausePhases": self.pause_phases}

    # -- the whole run --------------------------------------------------------------------

    async def run(self) -> None:
        try:
            try:
                await self._create_on_target()
                self._check_wanted()
                await self._finalize()
                await self._restore_on_target()
                await _call(self.session, "POST", f"{self.req.base_url}/commit", {})
            except BaseException as exc:
                await self._rollback(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            self.phase, self.message = "HandedOver", "the target's containers run; the source's are frozen"
            try:
                await asyncio.wait_for(self.completed.wait(), COMPLETE_WAIT)
                why = "completed"
            except asyncio.TimeoutError:
                why = f"no complete within {COMPLETE_WAIT:.0f} s of the hand-over"
            await asyncio.to_thread(self._end_source)
            self.phase, self.message = "Completed", f"the source's copy was ended ({why})"
        except Exception as exc:  # noqa: BLE001 - after the hand-over nothing can be rolled back
            log.exception("pod migration %s: ending the source copy failed", self.req.id)
            self.phase, self.message = "Failed", f"ending the source's frozen copy failed: {exc}"
        finally:
            shutil.rmtree(self.out, ignore_errors=True)

    async def _create_on_target(self) -> None:
        body = {"pod": {"namespace": self.req.namespace, "name": self.req.name, "uid": self.req.uid},
                "targetPod": self.req.target_pod, "containers": [c.name for c in self.containers]}
        await _call(self.session, "POST", self.req.base_url, body)
        self.created_on_target = True

    # -- the pause -------------------------------------------------------------------------

    async def _finalize(self) -> None:
        self.phase = "Finalizing"
        self.out.mkdir(mode=0o700, parents=True, exist_ok=True)
        began = time.monotonic()
        await asyncio.to_thread(self._freeze)
        self.frozen_at = time.monotonic()
        self.pause_phases["freeze"] = _ms(self.frozen_at - began)
        for c in self.containers:
            t = time.monotonic()
            layer = await asyncio.to_thread(self._checkpoint, c)
            self.pause_phases[f"checkpoint {c.name}"] = _ms(time.monotonic() - t)
            t = time.monotonic()
            sent = await transfer.send_layer(self.session, self.req.base_url, layer, self.limiter)
            self.transferred += sent.bytes
            self.pause_phases[f"transfer {c.name}"] = _ms(time.monotonic() - t)

    def _freeze(self) -> None:
        """Every app container of the pod stops at once (one pause for the pod, consistent
        between its containers) and stays stopped through the checkpoints."""
        for c in self.containers:
            f = podruntime.freezer(c)
            self.freezers.append(f)
            f.freeze()

    def _checkpoint(self, c: PodContainer) -> Path:
        work = self.out / f"{c.name}.work"
        work.mkdir(mode=0o700, exist_ok=True)
        with LayerWriter(self.out / c.name) as out:
            began = time.monotonic()
            podruntime.checkpoint(c, out.dir, work, None)
            took = time.monotonic() - began
            manifest = Manifest(kind="final", parent=None, pids=[c.pid], backend="runc", pages=0, bytes=0,
                                described_pages=0, seconds=round(took, 6),
                                how="runc checkpoint --leave-running (every page)")
            return out.commit(manifest)

    async def _restore_on_target(self) -> None:
        self.phase = "Restoring"
        t = time.monotonic()
        for c in self.containers:
            await _call(self.session, "POST", f"{self.req.base_url}/restore", {"layer": c.name})
        deadline = time.monotonic() + RESTORE_WAIT
        while True:
            self._check_wanted()
            state = await _call(self.session, "GET", self.req.base_url, None)
            if state.get("state") == "restored":
                break
            if state.get("state") == "failed":
                raise MigrationError(f"restore on {self.req.target} failed: {state.get('message')}")
            if time.monotonic() > deadline:
                raise MigrationError(f"the target pod's containers were not restored on {self.req.target} "
                                     f"within {RESTORE_WAIT:.0f} s (is the target pod with runtimeClassName "
                                     f"memsnap and annotation memsnap.io/restore-from={self.req.id} there?)")
            await asyncio.sleep(POLL)
        running = time.monotonic()
        self.downtime_ms = _ms(running - self.frozen_at)
        self.pause_phases["restore (target)"] = max(
            (float(r.get("restore_ms", 0)) for r in state.get("results", {}).values()), default=0.0)
        self.pause_phases["until running"] = _ms(running - t)

    # -- hand-over and rollback ------------------------------------------------------------

    def complete(self) -> None:
        self.completed.set()

    def abort(self, why: str) -> None:
        self.aborted = why

    def _check_wanted(self) -> None:
        if self.aborted:
            raise MigrationError(self.aborted)

    def _end_source(self) -> None:
        """SIGKILL every process of the pod's app containers while frozen, then thaw: a frozen
        task dies on the thaw without running another instruction of its own."""
        paths = self.cgroups
        for pid in cgroupfs.tasks(paths):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for f in self.freezers:
            f.thaw()
        cgroupfs.kill_tasks(paths, f"pod {self.req.pod}'s containers")

    async def _rollback(self, exc: BaseException) -> None:
        why = str(exc) or type(exc).__name__
        log.warning("pod migration %s of %s to %s failed, rolling back: %s", self.req.id, self.req.pod,
                    self.req.target, why)
        problems = []
        if self.created_on_target:
            try:
                await asyncio.wait_for(_call(self.session, "DELETE", self.req.base_url, None), 10)
            except Exception as e:  # noqa: BLE001 - the target's lease removes it anyway
                problems.append(f"could not tell {self.req.target} to drop it: {e}")
        for f in self.freezers:
            try:
                f.thaw()
            except OSError as e:
                problems.append(f"could not thaw {f.path}: {e}")
        shutil.rmtree(self.out, ignore_errors=True)
        if any("thaw" in p for p in problems):
            self.phase = "Failed"
        else:
            self.phase = "RolledBack"
        self.message = f"{why}; rolled back: the pod runs on {self.node}" + (f" ({'; '.join(problems)})" if problems else "")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
