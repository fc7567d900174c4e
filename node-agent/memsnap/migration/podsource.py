"""The source half of a pod migration (the operator's engine): every app container of a pod
on this node moves to a target pod on another node, which kubelet created there through
RuntimeClass memsnap and whose containers memsnap-runc restores at `create`.

    PreCopying  -> the target is told which containers come; pre-copy rounds of memsnap
                   layers per container (tracker + CRIU-format images), sent while it runs
    Finalizing  -> every app container's freezer cgroup is frozen (one pause for the pod),
                   `runc checkpoint --leave-running --parent-path <last layer>` of each, with
                   CRIU writing only what changed (--track-mem-uffd), each sent
    Restoring   -> the target's agent marks the images ready; the target's wrapper restores
                   them when kubelet creates the containers; the target confirms they run
    HandedOver  -> the target holds the pod (committed); the source's copy stays frozen until
                   the caller deletes the source pod and calls complete (or COMPLETE_WAIT)
    Completed   -> the source's processes got SIGKILL while frozen, then the thaw: no user
                   code of theirs ran again
    RolledBack  -> any failure (or DELETE) before HandedOver: the source thawed and running,
                   nothing left on the target; Failed: what could not even be rolled back
                   (or, after the hand-over, ended)

It runs in the background: the API answers at once and reports status() when asked.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .. import cgroupfs, procfs
from ..checkpoint import criu, precopy
from ..checkpoint.layers import described_in
from ..checkpoint.vmflags import EarlyVmFlags
from ..images import criu_format as cf
from ..images.layer import LayerWriter, Manifest, read_manifest
from ..tracking import TrackingError, VmaSelection, registry
from ..tracking.base import TargetGone
from ..tracking.uffd_wp import UffdWp
from . import podruntime, transfer
from .planner import Planner, Policy, Round
from .podruntime import PodContainer
from .source import OUTGOING, MigrationError, _call, _fixed_cost, _memory_bytes, _restore_source, ask_commit

log = logging.getLogger(__name__)

COMPLETE_WAIT = 60.0  # s after HandedOver: then the source ends its copy itself
RESTORE_WAIT = 150.0  # s for the target's containers to be restored (kubelet's create included)
POLL = 0.05
PHASES = ("PreCopying", "Finalizing", "Restoring", "HandedOver", "Completed", "Failed", "RolledBack")
ENDED = ("Completed", "Failed", "RolledBack")
POD_RECORD = "pod.json"  # in outgoing/<id>/: what recover() needs


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
    def __init__(self, req: PodRequest, node: str, containers: list[PodContainer], session: aiohttp.ClientSession,
                 lend_tracking=None):
        self.req, self.node, self.containers, self.session = req, node, containers, session
        self.lend_tracking = lend_tracking  # the agent's pod tracking steps aside meanwhile
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
        self.starttimes = {c.name: procfs.read_stat(c.pid).starttime for c in containers}
        self.layers: dict[str, list[Path]] = {c.name: [] for c in containers}  # pre-copied, oldest first
        self.trackers: dict[str, dict[int, UffdWp]] = {}  # resumed for the final dump
        self.dirty_rate = 0.0
        self.predicted_ms: float | None = None
        self.memory = 0
        self.frozen_at = 0.0
        self.final_how: dict[str, str] = {}  # container -> how its final image was made
        self.lazy_bytes = 0  # what the target's restore left to its background fill
        self.fill_seconds: float | None = None
        self.vmflags: EarlyVmFlags | None = None  # read before the freeze, for CRIU
        self.vmflags_kept: list[int] = []  # the pids whose flags still held at the freeze

    def status(self) -> dict:
        return {"id": self.req.id, "phase": self.phase, "iterations": self.iterations,
                "transferredBytes": self.transferred, "remainingBytes": self.remaining,
                "dirtyRate": round(self.dirty_rate), "predictedDowntimeMs": self.predicted_ms,
                "downtimeMs": self.downtime_ms, "memoryBytes": self.memory,
                "message": self.message, "sourceNode": self.node, "targetNode": self.req.target,
                "pod": {"namespace": self.req.namespace, "name": self.req.name, "uid": self.req.uid},
                "containers": [c.name for c in self.containers], "pausePhases": self.pause_phases,
                "finalImages": self.final_how, "lazyBytes": self.lazy_bytes, "fillSeconds": self.fill_seconds}

    # -- the whole run --------------------------------------------------------------------

    async def run(self) -> None:
        # The pod's UID too: children born during the migration (a shell's) are ours as well.
        pids = {pid for c in self.containers for pid in [c.pid] + procfs.descendants(c.pid)} | {self.req.uid}
        if self.lend_tracking is not None:
            await self.lend_tracking(pids, True)
        try:
            await self._run()
        finally:
            if self.lend_tracking is not None:
                await self.lend_tracking(pids, False)

    async def _run(self) -> None:
        try:
            try:
                self.out.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._record()
                self.memory = await asyncio.to_thread(lambda: sum(_memory_bytes(c.pid) for c in self.containers))
                self.remaining = self.memory
                await self._create_on_target()
                if self.req.policy.precopy:
                    await self._precopy()
                self._check_wanted()
                await self._finalize()
                await self._restore_on_target()
                await self._commit()
            except BaseException as exc:
                await self._rollback(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            self.phase, self.message = "HandedOver", "the target's containers run; the source's are frozen"
            self._record()
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

    # -- pre-copy (memsnap's tracker and layers, as for a process) ---------------------------

    async def _precopy(self) -> None:
        """Rounds over every container: a layer each (all memory, then what was written since),
        sent while the pod runs, until the planner predicts a pause that fits. Auto-converge's
        CPU throttle is not applied to pods (it would move the containers' tasks out of their
        cgroups); the timeouts apply."""
        planner = Planner(self.req.policy, self.memory, _fixed_cost())
        last_collect = time.monotonic()
        while True:
            self._check_wanted()
            pages = sent_bytes = 0
            first_collect = None
            for c in self.containers:
                parent = self.layers[c.name][-1] if self.layers[c.name] else None
                target = self.out / f"{c.name}.l{len(self.layers[c.name])}"
                layer = await asyncio.to_thread(precopy.write, c.pid, target, parent, durable=False)
                first_collect = first_collect or time.monotonic()  # the round's dirty sets were taken about now
                self.layers[c.name].append(layer)
                sent = await transfer.send_layer(self.session, self.req.base_url, layer, self.limiter)
                self.transferred += sent.bytes
                sent_bytes += sent.bytes
                pages += read_manifest(layer).pages
            r = Round(len(planner.rounds), pages, sent_bytes, first_collect - last_collect,
                      time.monotonic() - first_collect)
            last_collect = first_collect
            decision = planner.observe(r)
            self.iterations, self.remaining = len(planner.rounds), r.remaining_bytes
            self.dirty_rate, self.predicted_ms = r.dirty_rate, round(r.predicted_downtime_ms, 1)
            if decision.action == "finalize":
                self.message = f"pre-copy converged: {decision.reason}"
                return
            if decision.action == "fail":
                raise MigrationError(decision.reason)

    # -- the pause -------------------------------------------------------------------------

    async def _finalize(self) -> None:
        self.phase = "Finalizing"
        await asyncio.to_thread(self._prepare_tracking)
        self.vmflags = EarlyVmFlags([p for c in self.containers for p in self.trackers.get(c.name, {})], self.out)
        try:
            await asyncio.to_thread(self.vmflags.read)
            began = time.monotonic()
            await asyncio.to_thread(self._freeze)
            self.vmflags_kept = self.vmflags.settle()
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
        finally:
            self.vmflags.close()

    def _prepare_tracking(self) -> None:
        """Before the freeze (it needs the tasks running): the pre-copy trackers take back the
        write-protection, and the userfaultfd injected into the tasks is closed there (CRIU
        cannot dump one) while our duplicate keeps tracking. A task that exits meanwhile is
        left out; one born since the last layer has no tracker and is dumped whole."""
        for c in self.containers:
            trackers: dict[int, UffdWp] = {}
            self.trackers[c.name] = trackers
            for pid in [c.pid] + procfs.descendants(c.pid):
                if not registry.parked_backend(pid):
                    continue
                try:
                    trackers[pid] = registry.resume(pid, VmaSelection())
                except TargetGone:
                    if pid == c.pid:
                        raise
                except (TrackingError, OSError):
                    if pid == c.pid or procfs.alive(pid):
                        raise
            for t in trackers.values():
                t.drop_target_fd()

    def _trackers_of_live(self, name: str, pids: list[int]) -> dict[int, UffdWp]:
        """The container's trackers whose task still runs; those of tasks that exited since
        the pre-copy (zombies included: CRIU dumps no memory of theirs) are closed."""
        trackers = self.trackers.get(name, {})
        for pid in [p for p, t in trackers.items() if p not in pids or not procfs.alive(p, t.starttime)]:
            trackers.pop(pid).close()
        return trackers

    def _release_tracking(self, name: str) -> None:
        for t in self.trackers.pop(name, {}).values():
            try:
                t.close()
            except (TrackingError, OSError) as exc:
                log.error("could not release tracking of pid %d: %s", t.pid, exc)

    def _freeze(self) -> None:
        """Every app container of the pod stops at once (one pause for the pod, consistent
        between its containers) and stays stopped through the checkpoints."""
        self.freezers = [podruntime.freezer(c) for c in self.containers]
        self._record()  # before freezing: an agent that dies from here on leaves a way back
        for f in self.freezers:
            f.freeze()

    def _checkpoint(self, c: PodContainer) -> Path:
        """runc checkpoint of a frozen container. With a pre-copied chain whose every task is
        uffd-wp tracked, CRIU writes only the pages written since the last layer (memsnap's CRIU,
        --track-mem-uffd, given through runc's CRIU configuration file) and refers to the chain
        for the rest; otherwise every page."""
        work = self.out / f"{c.name}.work"
        work.mkdir(mode=0o700, exist_ok=True)
        parent = self.layers[c.name][-1] if self.layers[c.name] else None
        pids = [c.pid] + procfs.descendants(c.pid)  # frozen: the tree is fixed now
        trackers = self._trackers_of_live(c.name, pids)
        ids = procfs.image_ids(c.pid, pids)
        delta = (parent is not None and c.pid in trackers and _parent_tasks_tracked(parent, ids, trackers)
                 and all(isinstance(t, UffdWp) for t in trackers.values())
                 and (parent / "inventory.img").is_file() and criu.has_uffd_tracking())
        try:
            with LayerWriter(self.out / c.name, durable=False) as out:  # lives as long as the migration
                began = time.monotonic()
                if delta:
                    for pid, t in trackers.items():
                        t.hand_over(described_in(parent, ids[pid]))
                    podruntime.checkpoint(c, out.dir, work, parent, ["track-mem-uffd", *self.vmflags.criu_options()])
                    written = sum(t.written().pages for t in trackers.values())
                    how = ("runc checkpoint --leave-running --parent-path, CRIU --track-mem-uffd: only the "
                           f"pages written since {parent.name} ({written} seen by the tracker); VMA flags "
                           f"{self.vmflags.describe(pids, self.vmflags_kept)}")
                else:
                    self._release_tracking(c.name)
                    podruntime.checkpoint(c, out.dir, work, None)
                    how = "runc checkpoint --leave-running (every page)"
                if c is self.containers[0] and podruntime.pack_empty_dirs(self.req.uid, out.dir / podruntime.EMPTY_DIR_ARCHIVE):
                    how += "; the pod's emptyDir volumes packed beside it"
                took = time.monotonic() - began
                rel = f"../{parent.name}" if delta else None
                manifest = Manifest(kind="final", parent=rel, pids=sorted(pids), backend="runc", pages=0, bytes=0,
                                    described_pages=0, seconds=round(took, 6), how=how)
                self.final_how[c.name] = how
                return out.commit(manifest)
        finally:
            self._release_tracking(c.name)  # the dump is written (or failed): CRIU needed them until now

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
        self.lazy_bytes = int(state.get("lazy_bytes") or 0)
        self.pause_phases["restore (target)"] = max(
            (float(r.get("restore_ms", 0)) for r in state.get("results", {}).values()), default=0.0)
        self.pause_phases["until running"] = _ms(running - t)

    # -- hand-over and rollback ------------------------------------------------------------

    async def _commit(self) -> None:
        """The target keeps the pod once its background fill is in (ask_commit)."""
        async def progress(answer: dict) -> None:
            self.message = (f"the target fills the pod's memory in: {answer.get('filled_bytes', 0) >> 20} of "
                            f"{answer.get('lazy_bytes', 0) >> 20} MiB in {answer.get('fill_seconds', 0)} s")
        answer = await ask_commit(self.session, self.req.base_url, self.req.target, progress)
        self.fill_seconds = answer.get("fill_seconds")

    def _record(self) -> None:
        """What recover() needs if this agent dies mid-migration: whose tracking to release,
        which freezers to thaw, and whether the target already holds the pod (then the frozen
        source copy is killed, never thawed: two copies must not run)."""
        data = {"pod": self.req.pod, "handed_over": self.phase in ("HandedOver", "Completed"),
                "containers": [[c.pid, self.starttimes[c.name]] for c in self.containers],
                "freezers": [[str(f.path), f.v2] for f in self.freezers], "cgroups": [str(p) for p in self.cgroups]}
        tmp = self.out / ".pod.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.out / POD_RECORD)

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
        _kill_frozen(self.cgroups, self.freezers, self.req.pod)

    async def _rollback(self, exc: BaseException) -> None:
        why = str(exc) or type(exc).__name__
        log.warning("pod migration %s of %s to %s failed, rolling back: %s", self.req.id, self.req.pod,
                    self.req.target, why)
        problems = []
        for c in self.containers:  # no userfaultfd or write-protection left behind
            self._release_tracking(c.name)
            await asyncio.to_thread(_restore_source, c.pid, self.starttimes[c.name], None)
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


def recover() -> list[str]:
    """At agent start: pod migrations an earlier agent left. Before the hand-over the pod runs
    on here, thawed and untracked (the target's lease drops its half); after it, the frozen
    source copy is ended."""
    done = []
    if not OUTGOING.is_dir():
        return done
    for d in sorted(OUTGOING.iterdir()):
        try:
            rec = json.loads((d / POD_RECORD).read_text())
        except (OSError, ValueError):
            continue  # not a pod migration (source.recover's)
        freezers = [cgroupfs.Freezer(Path(p), bool(v2)) for p, v2 in rec.get("freezers", [])]
        try:
            if rec.get("handed_over"):
                _kill_frozen([Path(p) for p in rec.get("cgroups", [])], freezers, rec.get("pod", ""))
                done.append(f"pod migration {d.name} of {rec.get('pod')} was handed over: its source copy was ended")
            else:
                for f in freezers:
                    if f.path.exists():
                        f.thaw()
                for pid, starttime in rec.get("containers", []):
                    _restore_source(int(pid), int(starttime), None)
                done.append(f"pod migration {d.name} of {rec.get('pod')} was cut short: the pod runs on here")
        except Exception as exc:  # noqa: BLE001 - recover the others
            done.append(f"could not recover pod migration {d.name}: {exc}")
        shutil.rmtree(d, ignore_errors=True)
    return done


def _kill_frozen(cgroups: list[Path], freezers: list[cgroupfs.Freezer], what: str) -> None:
    """SIGKILL every task while frozen, then thaw: none runs another instruction of its own."""
    for pid in cgroupfs.tasks(cgroups):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for f in freezers:
        if f.path.exists():
            f.thaw()
    cgroupfs.kill_tasks(cgroups, f"pod {what}'s containers")


def _parent_tasks_tracked(parent: Path, ids: dict[int, int], trackers: dict) -> bool:
    """Whether every live task the parent layer names is tracked, so CRIU may take an
    unwritten page of it from the chain. A task the parent does not name (a child born after
    that layer) needs no tracker: CRIU finds no parent pagemap for it and dumps it whole."""
    return all(pid in trackers for pid, image_id in ids.items()
               if procfs.alive(pid) and cf.pagemap_path(parent, image_id).is_file())


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
