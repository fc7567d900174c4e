"""The source half of a migration: pre-copy rounds to the target's agent, the pause, the
hand-over, and the rollback that leaves the workload as it was whatever fails.

    rounds:  layer l0 (all memory), l1, l2 ... (pages written since) -> sent while it runs
    pause:   freeze (cgroup) -> last dirty set + CRIU state dump, leave-running -> send
             -> target restores and confirms it runs -> commit -> end the source copy

Blocking work (tracking, CRIU) runs in one worker thread per migration; the network is async.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

from .. import cgroupfs, containers, procfs
from ..checkpoint import final, precopy
from ..checkpoint.freezer import FreezeError, frozen_by_us
from ..checkpoint.vmflags import EarlyVmFlags
from ..images.layer import read_manifest
from ..kernel.pagemap import PAGE_SIZE
from ..tracking import TrackingError, VmaSelection, registry
from . import throttle, transfer
from .target import fill_bound
from .planner import Decision, Planner, Policy, Round

log = logging.getLogger(__name__)

OUTGOING = Path("/var/lib/memsnap/outgoing")
COSTS = Path("/var/lib/memsnap/migration-costs.json")
DEFAULT_FIXED_COST = 0.15  # s: state dump + restore + confirm, until one was measured here
COMMIT_WAIT = 30.0  # s without an answer to a commit: longer than the target's lease
LEASE_RENEWAL = 5.0  # s between word to the target while the source works on its own

Emit = Callable[[dict], Awaitable[None]]


class MigrationError(Exception):
    """The migration failed and was rolled back; the message says why."""


@dataclass
class Request:
    pid: int
    target: str  # node name
    port: int  # of the target's agent
    policy: Policy
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def base_url(self) -> str:
        """This migration on the target's agent."""
        return f"https://{self.target}:{self.port}/api/v1/incoming/{self.id}"


class SourceMigration:
    def __init__(self, req: Request, session: aiohttp.ClientSession, emit: Emit,
                 still_wanted: Callable[[], bool] = lambda: True):
        self.req, self.session, self.emit, self.still_wanted = req, session, emit, still_wanted
        self.root = req.pid
        self.starttime = procfs.read_stat(req.pid).starttime
        self.container = containers.container_of(req.pid) or ""
        self.out = OUTGOING / req.id
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"memsnap-mig-{req.id}")
        self.limiter = transfer.RateLimiter(req.policy.bandwidth_bytes_s)
        self.throttle: throttle.Throttle | None = None
        self.created_on_target = False
        self.layers: list[Path] = []
        self.untrack: list = []  # the final layer's trackers, closed once the pause is over
        self.vmflags: EarlyVmFlags | None = None  # read once the pause draws near; final.write closes them
        self.transferred = 0
        self.converged_because = "stop-and-copy: no pre-copy"

    async def _blocking(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.worker, lambda: fn(*args, **kwargs))

    # -- the whole run --------------------------------------------------------------------

    async def run(self) -> dict:
        began = time.monotonic()
        self.out.mkdir(mode=0o700, parents=True)
        (self.out / "source.json").write_text(json.dumps({"pid": self.root, "starttime": self.starttime}))
        try:
            memory = await self._blocking(_memory_bytes, self.root)
            await self._create_on_target(memory)
            planner = Planner(self.req.policy, memory, _fixed_cost())
            if self.req.policy.precopy:
                await self._precopy(planner)
            summary = await self._pause_and_hand_over()
        except BaseException as exc:
            await self._rollback(exc)
            raise
        finally:
            self.worker.shutdown(wait=False)
        summary.update(planner.summary(), memory_bytes=memory, transferred_bytes=self.transferred,
                       converged=True, converged_because=self.converged_because, mode="pre-copy" if self.req.policy.precopy else "stop-and-copy",
                       total_seconds=round(time.monotonic() - began, 3))
        return summary

    async def _create_on_target(self, memory: int) -> None:
        c = containers.load(self.container) if self.container else None
        body = {"container": self.container, "argv": c.argv if c else [], "memory_bytes": memory}
        await _call(self.session, "POST", self.req.base_url, body)
        self.created_on_target = True

    # -- pre-copy ------------------------------------------------------------------------

    async def _precopy(self, planner: Planner) -> None:
        last_collect = time.monotonic()
        while True:
            self._check_wanted()
            layer, collected = await self._write_layer()
            written = time.monotonic()
            sent = await transfer.send_layer(self.session, self.req.base_url, layer, self.limiter)
            self.transferred += sent.bytes
            m = read_manifest(layer)
            r = Round(len(planner.rounds), m.pages, sent.bytes, collected - last_collect, time.monotonic() - written,
                      written - collected)
            last_collect = collected
            decision = planner.observe(r)
            await self.emit({"event": "round", **r.as_json()})
            if decision.action == "finalize":
                self.converged_because = decision.reason
                return
            if decision.action == "fail":
                raise MigrationError(decision.reason)
            await self._apply_throttle(decision)
            if self.vmflags is None and r.predicted_downtime_ms <= 2 * self.req.policy.max_downtime_ms:
                # The pause draws near: the VMA flags are read now (smaps walks every page, ~80 ms
                # at 4 GiB), out of the way of the last round; their guard watches until the freeze.
                self.vmflags = EarlyVmFlags([self.root] + procfs.descendants(self.root))
                await self._blocking(self.vmflags.read)

    async def _write_layer(self) -> tuple[Path, float]:
        name = f"l{len(self.layers)}"
        parent = self.layers[-1] if self.layers else None
        # The chain is ours, hashed file by file as each layer was committed: links only.
        marks: dict[str, float] = {}
        layer = await self._renewing_lease(self._blocking(
            precopy.write, self.root, self.out / name, parent, verify_parent=False,
            on_collect=lambda: marks.setdefault("collected", time.monotonic()), durable=False))
        collected = marks.get("collected", time.monotonic())  # the layer's dirty set was taken then
        self.layers.append(layer)
        return layer, collected

    async def _renewing_lease(self, work: Awaitable):
        """work's result; meanwhile the target hears from us every LEASE_RENEWAL s, so that its
        lease does not run out while a big layer is written (4 GiB: longer than the lease)."""
        task = asyncio.ensure_future(work)
        while not (await asyncio.wait({task}, timeout=LEASE_RENEWAL))[0]:
            try:
                await _call(self.session, "GET", self.req.base_url, None)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # the link's fate shows at the next transfer
        return task.result()

    async def _apply_throttle(self, d: Decision) -> None:
        if not d.throttle_percent:
            return
        if self.throttle is None:
            self.throttle = await self._blocking(throttle.Throttle.for_tree, self.root)
        await self._blocking(self.throttle.set, d.throttle_percent)

    # -- the pause -----------------------------------------------------------------------

    async def _pause_and_hand_over(self) -> dict:
        self._check_wanted()
        pause: dict[str, float] = {}  # where it went, seconds, from the freeze to running there
        marks: dict[str, float] = {}
        t0 = time.monotonic()
        parent = self.layers[-1] if self.layers else None  # none: stop-and-copy
        flags, self.vmflags = self.vmflags, None  # final.write closes them
        layer = await self._blocking(final.write, self.root, self.out / "final", parent,
                                     VmaSelection(), True, lambda: marks.update(frozen=time.monotonic(), frozen_wall=time.time()),
                                     self.untrack, False, flags)
        frozen_at = marks.get("frozen", t0)
        m = read_manifest(layer)
        pause.update(m.phases)
        pause["write layer"] = round(time.monotonic() - frozen_at - sum(m.phases.values()), 6)
        t = time.monotonic()
        sent = await transfer.send_layer(self.session, self.req.base_url, layer, self.limiter)
        self.transferred += sent.bytes
        pause["transfer"] = round(time.monotonic() - t, 6)
        self._check_wanted()
        t = time.monotonic()
        restored = await _call(self.session, "POST", f"{self.req.base_url}/restore", {"layer": "final"})
        running_at, running_wall = time.monotonic(), time.time()
        # The target merged the final layer into its flat image as the layer's commit arrived.
        pause["merge"] = restored.get("merge_seconds", 0.0)
        pause["transfer"] = round(max(0.0, pause["transfer"] - pause["merge"]), 6)
        pause["restore"] = restored.get("restore_seconds", 0.0)
        pause["until running"] = round(running_at - t - pause["restore"], 6)
        committed = await self._commit(restored.get("lazy_pages", 0) * PAGE_SIZE)
        await self._end_source()
        downtime = running_at - frozen_at
        _record_fixed_cost(m.phases, restored)
        return {"event": "done", "target_node": self.req.target, "target_pid": restored["pid"],
                # wall clock: to match the pause with the workload's own records
                "frozen_at": round(marks.get("frozen_wall", 0.0), 4), "running_at": round(running_wall, 4),
                "downtime_ms": round(downtime * 1000, 1), "final_layer_bytes": sent.bytes,
                "pause_phases": {k: round(v * 1000, 1) for k, v in pause.items()}, "vma_flags": m.vma_flags,
                "lazy_pages": restored.get("lazy_pages", 0), "fill_seconds": committed.get("fill_seconds"),
                "restore_phases": {k: round(v * 1000, 1) for k, v in restored.get("restore_phases", {}).items()}}

    async def _commit(self, lazy_bytes: int) -> dict:
        """Hand over; each "filling" answer is a progress event. The source copy is ended only
        after "committed"."""
        async def progress(answer: dict) -> None:
            await self.emit({"event": "fill", **{k: v for k, v in answer.items() if k != "state"}})
        return await ask_commit(self.session, self.req.base_url, self.req.target, progress,
                                limit=fill_bound(lazy_bytes) + COMMIT_WAIT)  # the target gives up first

    async def _end_source(self) -> None:
        await self._blocking(_end_tree, self.root, self.starttime, self.container)
        await self._blocking(self._untrack)  # the tree is gone: only our descriptors are left
        shutil.rmtree(self.out, ignore_errors=True)

    def _untrack(self) -> None:
        while self.untrack:
            try:
                self.untrack.pop().close()
            except (TrackingError, OSError) as exc:
                log.error("could not release tracking of pid %d: %s", self.root, exc)

    # -- rollback ------------------------------------------------------------------------

    def _check_wanted(self) -> None:
        if not self.still_wanted():
            raise MigrationError("the client that started the migration went away")

    async def _rollback(self, exc: BaseException) -> None:
        log.warning("migration %s of pid %d to %s failed, rolling back: %s", self.req.id, self.root,
                    self.req.target, exc)
        if self.created_on_target:
            try:
                await asyncio.wait_for(_call(self.session, "DELETE", self.req.base_url, None), 10)
            except Exception as e:  # noqa: BLE001 - the target's lease removes it anyway
                log.warning("could not tell %s to drop migration %s: %s", self.req.target, self.req.id, e)
        await self._blocking(self._untrack)  # before the thaw, as final.write does on failure
        if self.vmflags is not None:
            self.vmflags.close()
        await self._blocking(_restore_source, self.root, self.starttime, self.throttle)
        shutil.rmtree(self.out, ignore_errors=True)


# ---- blocking helpers (worker thread) ----------------------------------------------------

def recover() -> list[str]:
    """At agent start: a workload an earlier agent was migrating when it died runs on here,
    thawed and untracked (the target's lease drops its half)."""
    done = []
    if not OUTGOING.is_dir():
        return done
    for d in sorted(OUTGOING.iterdir()):
        try:
            src = json.loads((d / "source.json").read_text())
            _restore_source(int(src["pid"]), int(src["starttime"]), None)
            done.append(f"migration {d.name} of pid {src['pid']} was cut short: the workload runs on here")
        except (OSError, ValueError, KeyError):
            pass
        shutil.rmtree(d, ignore_errors=True)
    return done


def _memory_bytes(root: int) -> int:
    """Private writable memory of the tree: what must move."""
    total = 0
    for pid in [root] + procfs.descendants(root):
        try:
            total += sum(m.size for m in procfs.read_maps(pid) if m.writable and m.private)
        except (FileNotFoundError, ProcessLookupError):
            if pid == root:
                raise
            continue  # a short-lived child exited since it was listed
    return total


def _restore_source(root: int, starttime: int, thr: "throttle.Throttle | None") -> None:
    """The workload as it was: thawed, back in its own cgroup, untracked, unthrottled."""
    if procfs.alive(root, starttime):
        try:
            freezer = frozen_by_us(root)
            if freezer is not None:
                freezer.thaw()
                cgroupfs.leave(freezer.path)
        except (OSError, FreezeError) as exc:
            log.error("could not thaw pid %d: %s", root, exc)
        for pid in [root] + procfs.descendants(root):
            if registry.parked_backend(pid):
                try:
                    registry.resume(pid, VmaSelection()).close()
                except (TrackingError, OSError) as exc:
                    if procfs.alive(pid):
                        log.error("could not release tracking of pid %d: %s", pid, exc)
    if thr is not None:
        thr.reset()


def _end_tree(root: int, starttime: int, container: str) -> None:
    """End the frozen source copy: the container, or the freezer cgroup final.write left it in."""
    if container:
        containers.stop(container)
        return
    freezer = frozen_by_us(root) if procfs.alive(root, starttime) else None
    if freezer is not None:
        cgroupfs.kill_tasks([freezer.path], f"pid {root}'s tree")
        cgroupfs.rmdir(freezer.path)


def _fixed_cost() -> float:
    try:
        return float(json.loads(COSTS.read_text())["fixed_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_FIXED_COST


def _record_fixed_cost(phases: dict[str, float], restored: dict) -> None:
    """State dump and restore, as measured: the next migration's planner predicts with it."""
    # With memsnap's CRIU the dump's state part is its own phase; otherwise the whole dump counts.
    state = phases.get("criu state dump", phases.get("criu dump", 0.0))
    fixed = state + phases.get("freeze", 0.0) + float(restored.get("restore_seconds", 0.0))
    try:
        COSTS.parent.mkdir(parents=True, exist_ok=True)
        COSTS.write_text(json.dumps({"fixed_seconds": round(fixed, 4), "measured": time.time()}))
    except OSError:
        pass


# ---- talking to the target ---------------------------------------------------------------

async def ask_commit(session: aiohttp.ClientSession, base_url: str, target: str,
                     progress: Callable[[dict], Awaitable[None]], limit: float | None = None) -> dict:
    """Ask the target to commit until it holds the workload for good. It answers within seconds:
    "filling" (handed to progress) while its background fill runs, and is asked again, which
    keeps the link and its lease alive; "committed"; 410 for a repeated commit of a pod whose
    answer was lost (it was committed); or an error, raised: a failed fill, or 404 (its lease
    dropped the migration). A target silent for COMMIT_WAIT s (longer than its lease), or still
    filling after limit s, has killed its copy: raised too, and the caller rolls back."""
    heard = time.monotonic()
    give_up = None if limit is None else heard + limit
    while True:
        try:
            answer = await _call(session, "POST", f"{base_url}/commit", {})
        except MigrationError as exc:
            if "answered 410" in str(exc):
                return {"state": "committed"}
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if time.monotonic() - heard > COMMIT_WAIT:
                raise MigrationError(f"could not commit the hand-over to {target}: {exc}") from None
            await asyncio.sleep(1.0)
            continue
        heard = time.monotonic()
        if answer.get("state") != "filling":
            return answer
        await progress(answer)
        if give_up is not None and heard > give_up:
            raise MigrationError(f"the background fill on {target} did not end in {limit:.0f} s")


async def _call(session: aiohttp.ClientSession, method: str, url: str, body: dict | None) -> dict:
    kwargs = {"json": body} if body is not None else {}
    async with session.request(method, url, **kwargs) as resp:
        try:
            data = await resp.json()
        except (aiohttp.ContentTypeError, ValueError):
            data = {"error": (await resp.text())[:200]}
        if resp.status >= 400:
            raise MigrationError(f"{method} {url.split('/api/v1')[-1]}: target answered {resp.status}: "
                                 f"{data.get('error') or resp.reason}")
        return data

