"""One tracking session per pod process, kept in step with discovery, within the node's caps.

`TrackerPool.cycle()` does one period's work, blocking (the server runs it in one worker
thread, so no two rounds of a session ever overlap): discover pod processes, end the sessions
of vanished ones, run a round on every session, start sessions for new processes while the
memory and CPU caps allow, and publish an immutable `Snapshot` for /metrics and the API.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from ..tracking import PageRanges, Round, TrackingError, open_session
from ..tracking.base import TargetGone
from ..tracking.session import TrackSession
from . import discovery
from .config import Config
from .discovery import PodProcess
from .pods import PodDirectory, PodMeta, selected
from .window import WindowUnion

log = logging.getLogger(__name__)

SCAN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, float("inf"))
RETRY_AFTER_ERROR = 6  # intervals before a process that failed to start is tried again
RETRY_AFTER_CPU = 6  # intervals before a process shed for CPU is tried again
CPU_CYCLES = 6  # the agent's CPU use is averaged over this many cycles

Key = tuple[int, int]  # (pid, starttime): a process, safe from pid reuse


@dataclass
class Tracked:
    """A live session and what it measured."""

    proc: PodProcess
    session: TrackSession
    window: WindowUnion  # the last --window of rounds
    tracked_bytes: int = 0
    dirty_pages_total: int = 0
    dirty_bytes_per_second: float = 0.0
    working_set_bytes: int = 0
    vmas: int = 0
    scan_seconds: float = 0.0


@dataclass(frozen=True)
class Skip:
    reason: str  # not-selected, no-metadata, memory-limit, cpu-limit, error
    detail: str
    retry_at: float = 0.0  # monotonic time; 0: decided afresh every cycle


# The published view (immutable once built)


@dataclass(frozen=True)
class ProcessView:
    pid: int
    comm: str
    backend: str = ""
    tracked_bytes: int = 0
    vmas: int = 0
    dirty_bytes_per_second: float = 0.0
    dirty_pages_total: int = 0
    working_set_bytes: int = 0
    scan_seconds: float = 0.0
    skipped: str = ""  # reason, when not tracked
    detail: str = ""


@dataclass(frozen=True)
class ContainerView:
    namespace: str
    pod: str  # the pod's name, or its UID without API
    pod_uid: str
    container: str  # the container's name, or its ID without API ("" : the pod's own cgroup)
    container_id: str
    processes: tuple[ProcessView, ...]
    dirty_pages_total: int  # monotonic over the container's life, whatever its processes do
    vma_events: dict[str, int]

    def _tracked(self):
        return [p for p in self.processes if not p.skipped]

    @property
    def dirty_bytes_per_second(self) -> float:
        return sum(p.dirty_bytes_per_second for p in self._tracked())

    @property
    def tracked_bytes(self) -> int:
        return sum(p.tracked_bytes for p in self._tracked())

    @property
    def working_set_bytes(self) -> int:
        return sum(p.working_set_bytes for p in self._tracked())

    @property
    def tracked_processes(self) -> int:
        return len(self._tracked())


@dataclass(frozen=True)
class Snapshot:
    time: float = 0.0
    cycles: int = 0
    containers: tuple[ContainerView, ...] = ()
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count since start
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> processes now
    backends: dict[str, int] = field(default_factory=dict)  # backend -> processes now
    scan_buckets: tuple[int, ...] = (0,) * len(SCAN_BUCKETS)  # cumulative
    scan_count: int = 0
    scan_sum: float = 0.0
    cycle_seconds: float = 0.0
    cpu_seconds: float = 0.0
    tracked_bytes: int = 0
    kube_api: str = "none"  # none, ok, or the last error


class TrackerPool:
    def __init__(self, cfg: Config, directory: PodDirectory | None = None):
        self.cfg = cfg
        self.directory = directory
        self.tracked: dict[Key, Tracked] = {}
        self.skips: dict[Key, Skip] = {}
        self.counters: dict[tuple[str, str], Counter] = {}  # (pod uid, container id) -> totals
        self.errors: Counter = Counter()
        self.scan_buckets = [0] * len(SCAN_BUCKETS)
        self.scan_count, self.scan_sum = 0, 0.0
        self.cycles = 0
        self.window_rounds = max(1, round(cfg.window / cfg.interval))
        self._cpu_marks: deque[tuple[float, float]] = deque(maxlen=CPU_CYCLES)
        self.snapshot = Snapshot()
        self.lent: frozenset[int | str] = frozenset()  # pids and pod UIDs a migration tracks itself meanwhile

    # One period

    def cycle(self) -> Snapshot:
        began = time.monotonic()
        pods = discovery.scan(self.cfg.proc)
        me = os.getpid()  # in a DaemonSet the agent is a pod process too: never trace ourselves
        procs = {(p.pid, p.starttime): p for pod in pods.values()
                 for c in pod.containers.values() for p in c.processes if p.pid != me and not self._is_lent(p)}
        self._end_vanished(procs)
        self._run_rounds()
        over_cpu = self._shed_for_cpu()
        self._admit(procs, over_cpu)
        self._shed_for_memory()
        self.cycles += 1
        self.snapshot = self._publish(procs, began)
        return self.snapshot

    def lend(self, pids: set[int | str]) -> None:
        """A migration tracks these itself (one tracker per process): end their sessions here
        and leave them alone until give_back. Pids, or pod UIDs: every process of the pod,
        children born later too (a shell's). Run it on the pool's worker, between cycles."""
        self.lent = frozenset(self.lent | pids)
        for key in [k for k, t in self.tracked.items() if self._is_lent(t.proc)]:
            self._end(key)

    def give_back(self, pids: set[int | str]) -> None:
        self.lent = frozenset(self.lent - pids)

    def _is_lent(self, p: discovery.PodProcess) -> bool:
        return p.pid in self.lent or p.cgroup.pod_uid in self.lent

    def stop_all(self) -> None:
        """End every session, leaving each target as it was (SIGTERM, shutdown)."""
        for key in list(self.tracked):
            self._end(key)

    # Steps

    def _end_vanished(self, procs: dict[Key, PodProcess]) -> None:
        for key in [k for k in self.tracked if k not in procs]:
            self._end(key)
        for key in [k for k in self.skips if k not in procs]:
            del self.skips[key]

    def _run_rounds(self) -> None:
        for key, t in list(self.tracked.items()):
            try:
                r = t.session.round()
            except TargetGone:  # exited, or exec'd under a backend that cannot follow exec
                self._end(key)
                continue
            except Exception as exc:  # TrackingError, or a bug: one process must not stop the rest
                self._fail(key, t.proc, exc)
                self._end(key)
                continue
            self._record(t, r)

    def _record(self, t: Tracked, r: Round) -> None:
        t.dirty_pages_total += r.dirty_pages
        t.dirty_bytes_per_second = r.dirty_bytes / r.interval_seconds if r.interval_seconds else 0.0
        t.tracked_bytes, t.vmas, t.scan_seconds = r.tracked_bytes, r.vmas, r.scan_seconds
        t.window.push(PageRanges(span for s in r.samples for span in s.dirty))
        t.working_set_bytes = t.window.union().bytes
        # Container totals outlive the processes that fed them: counters never go backwards.
        totals = self._totals(t.proc)
        totals["dirty_pages"] += r.dirty_pages
        for s in r.samples:
            for e in s.events:
                totals["vma:" + e.kind] += 1
        self._observe_scan(r.scan_seconds)

    def _admit(self, procs: dict[Key, PodProcess], over_cpu: bool) -> None:
        now = time.monotonic()
        budget = self._memory_left()
        for key, proc in sorted(procs.items()):
            if key in self.tracked:
                continue
            old = self.skips.get(key)
            if old and old.retry_at > now:
                continue
            ok, why = selected(self.cfg.selection, self._meta(proc.cgroup.pod_uid))
            if not ok:
                reason = "no-metadata" if why == "no-metadata" else "not-selected"
                self.skips[key] = Skip(reason, why)
                continue
            if over_cpu:
                self.skips[key] = Skip("cpu-limit", f"the agent is over its {self.cfg.cpu_limit} core limit")
                continue
            size = _trackable_bytes(proc.pid, self.cfg)
            if budget is not None and size > budget:
                self.skips[key] = Skip("memory-limit", f"{size} bytes would exceed the node's cap "
                                                       f"of {self.cfg.max_tracked_bytes}")
                continue
            if self._start(key, proc, size) and budget is not None:
                budget -= size

    def _start(self, key: Key, proc: PodProcess, size: int) -> bool:
        session = open_session(proc.pid, self.cfg.backend, tree=False, selection=self.cfg.vmas)
        try:
            session.start(recover=False)  # done once, when the agent starts
        except Exception as exc:
            _quietly_stop(session)
            if isinstance(exc, TargetGone) or not _alive(proc):
                return False  # exited meanwhile: not an error
            self._fail(key, proc, exc)
            return False
        self.skips.pop(key, None)
        self.tracked[key] = Tracked(proc, session, WindowUnion(self.window_rounds), tracked_bytes=size)
        log.info("tracking", extra={"pid": proc.pid, "comm": proc.comm, "pod_uid": proc.cgroup.pod_uid,
                                    "container_id": proc.cgroup.container_id, "backend": session.backend})
        return True

    def _shed_for_cpu(self) -> bool:
        """Over the CPU cap (averaged over the last few cycles): stop the costliest session.
        Returns whether the agent is over, so that no new session starts this cycle."""
        self._cpu_marks.append((time.monotonic(), time.process_time()))
        (wall0, cpu0), (wall1, cpu1) = self._cpu_marks[0], self._cpu_marks[-1]
        if wall1 - wall0 < self.cfg.interval / 2:
            return False  # the first cycle: nothing to average yet
        cores = (cpu1 - cpu0) / (wall1 - wall0)
        if cores <= self.cfg.cpu_limit:
            return False
        if self.tracked:
            key = max(self.tracked, key=lambda k: self.tracked[k].scan_seconds)
            proc = self.tracked[key].proc
            self._end(key)
            self.skips[key] = Skip("cpu-limit", f"shed: the agent used {cores:.2f} cores, "
                                                f"over its {self.cfg.cpu_limit} limit",
                                   time.monotonic() + RETRY_AFTER_CPU * self.cfg.interval)
            log.warning("shed for CPU", extra={"pid": proc.pid, "cores": round(cores, 3)})
            self._cpu_marks.clear()  # judge the reduced load afresh
        return True

    def _shed_for_memory(self) -> None:
        """Tracked processes grew past the cap: stop the largest until under it."""
        cap = self.cfg.max_tracked_bytes
        while cap and self.tracked and sum(t.tracked_bytes for t in self.tracked.values()) > cap:
            key = max(self.tracked, key=lambda k: self.tracked[k].tracked_bytes)
            size = self.tracked[key].tracked_bytes
            self._end(key)
            self.skips[key] = Skip("memory-limit", f"grew to {size} bytes, over the node's cap of {cap}")

    # Helpers

    def _end(self, key: Key) -> None:
        t = self.tracked.pop(key)
        try:
            t.session.stop()
        except Exception as exc:
            self._fail(key, t.proc, exc)

    def _fail(self, key: Key, proc: PodProcess, exc: Exception) -> None:
        reason = error_reason(exc)
        self.errors[reason] += 1
        self.skips[key] = Skip("error", f"{reason}: {exc}",
                               time.monotonic() + RETRY_AFTER_ERROR * self.cfg.interval)
        log.warning("tracking error", extra={"pid": proc.pid, "reason": reason, "error": str(exc),
                                             "pod_uid": proc.cgroup.pod_uid})

    def _totals(self, proc: PodProcess) -> Counter:
        return self.counters.setdefault((proc.cgroup.pod_uid, proc.cgroup.container_id), Counter())

    def _memory_left(self) -> int | None:
        if not self.cfg.max_tracked_bytes:
            return None
        return self.cfg.max_tracked_bytes - sum(t.tracked_bytes for t in self.tracked.values())

    def _meta(self, uid: str) -> PodMeta | None:
        return self.directory.lookup(uid) if self.directory else None

    def _observe_scan(self, seconds: float) -> None:
        for i, bound in enumerate(SCAN_BUCKETS):
            if seconds <= bound:
                self.scan_buckets[i] += 1
        self.scan_count += 1
        self.scan_sum += seconds

    # Publishing

    def _publish(self, procs: dict[Key, PodProcess], began: float) -> Snapshot:
        groups: dict[tuple[str, str], list[ProcessView]] = {}
        for key, proc in sorted(procs.items()):
            groups.setdefault((proc.cgroup.pod_uid, proc.cgroup.container_id), []).append(self._view(key, proc))
        live = set(groups)
        for gone in [k for k in self.counters if k not in live]:
            del self.counters[gone]  # the container is gone: its series end
        containers = tuple(self._container(uid, cid, views) for (uid, cid), views in groups.items())
        skipped = Counter(s.reason for k, s in self.skips.items() if k in procs)
        backends = Counter(t.session.backend for t in self.tracked.values())
        api = "none" if not (self.directory and self.directory.available) else (self.directory.error or "ok")
        return Snapshot(time.time(), self.cycles, containers, dict(self.errors), dict(skipped),
                        dict(backends), tuple(self.scan_buckets), self.scan_count, self.scan_sum,
                        time.monotonic() - began,
                        time.process_time(), sum(t.tracked_bytes for t in self.tracked.values()), api)

    def _view(self, key: Key, proc: PodProcess) -> ProcessView:
        t = self.tracked.get(key)
        if t is None:
            skip = self.skips.get(key, Skip("pending", "tracked from the next cycle on"))
            return ProcessView(proc.pid, proc.comm, skipped=skip.reason, detail=skip.detail)
        return ProcessView(proc.pid, proc.comm, t.session.backend, t.tracked_bytes, t.vmas,
                           t.dirty_bytes_per_second, t.dirty_pages_total, t.working_set_bytes,
                           t.scan_seconds)

    def _container(self, uid: str, cid: str, views: list[ProcessView]) -> ContainerView:
        meta = self._meta(uid)
        namespace, pod, container = "", uid, cid
        if meta:
            namespace, pod = meta.namespace, meta.name
            container = meta.containers.get(cid, cid)
        totals = self.counters.get((uid, cid), Counter())
        events = {k[4:]: v for k, v in totals.items() if k.startswith("vma:")}
        return ContainerView(namespace, pod, uid, container, cid, tuple(views),
                             totals["dirty_pages"], events)


def error_reason(exc: Exception) -> str:
    """A short, bounded label for a tracking error (for metrics and alerts)."""
    if not isinstance(exc, TrackingError):
        return "internal"  # a bug of ours, logged with its message
    text = str(exc)
    for needle, reason in (("not permitted", "permission"), ("already tracked", "already-tracked"),
                           ("already uses userfaultfd", "uffd-in-use"), ("seccomp", "seccomp"),
                           ("no backend", "no-backend"), ("cleanup failed", "cleanup"),
                           ("no process", "gone")):
        if needle in text:
            return reason
    return "other"


def _trackable_bytes(pid: int, cfg: Config) -> int:
    try:
        return sum(m.size for m in cfg.vmas.select(pid))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0


def _alive(proc: PodProcess) -> bool:
    from .. import procfs
    return procfs.alive(proc.pid, proc.starttime)


def _quietly_stop(session: TrackSession) -> None:
    try:
        session.stop()
    except Exception as exc:
        log.warning("cleanup after a failed start failed", extra={"pid": session.pid, "error": str(exc)})
