"""Incremental checkpoints of a running pod (a PodCheckpoint's node side).

One checkpoint is the pod migration's final step without the move: every app container is
frozen at once (one consistent moment for the pod), `runc checkpoint --leave-running` writes
each, then the pod runs on. Between checkpoints memsnap's uffd-wp trackers stay alive in the
agent (they hold a duplicate of the userfaultfd; the one injected into the tasks is closed,
as CRIU cannot dump it), so each dump is made against the previous checkpoint with CRIU's
--track-mem-uffd and writes only the pages written since. After the dump, still frozen, the
trackers re-protect (a collect): no write between the dump and the next one is missed.

A container's chain starts with a memsnap layer of all its memory written while it runs
(precopy.write, as pre-copy does), so even the first checkpoint's pause holds only a delta.
It starts again so (a full layer) when the trackers are gone: a new agent, a restarted
container, a failed checkpoint, or a task CRIU must take whole.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import cgroupfs, procfs
from ..checkpoint import criu, precopy
from ..checkpoint.layers import described_in
from ..checkpoint.vmflags import EarlyVmFlags
from ..images.layer import LayerWriter, Manifest
from ..migration import podruntime
from ..migration.podruntime import PodContainer
from ..migration.podsource import _parent_tasks_tracked
from ..migration.source import _restore_source
from ..tracking import TrackingError, VmaSelection, registry
from ..tracking.base import TargetGone
from ..tracking.uffd_wp import UffdWp
from . import store

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass
class Tracked:
    """A container's live trackers, valid while the same container (id, init pid) runs."""
    container_id: str
    pid: int
    trackers: dict[int, UffdWp] = field(default_factory=dict)


@dataclass
class PodChain:
    id: str
    namespace: str
    name: str
    uid: str
    tracked: dict[str, Tracked] = field(default_factory=dict)  # by container name
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.name}"

    # -- one checkpoint -------------------------------------------------------------------

    def take(self, retention: int) -> dict:
        """One checkpoint of every app container, then pruning to `retention`. A failure leaves
        the earlier checkpoints as they were and the pod running (thawed, untracked)."""
        containers = podruntime.app_containers(self.uid)
        if not containers:
            raise CheckpointError(f"no pod {self.pod} (uid {self.uid}) with running containers on this node", 404)
        base = store.root(self.id)
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(store.ROOT, 0o700)
        previous = (store.names(self.id) or [None])[-1]
        name = store.new_name()
        if previous is not None and name <= previous:
            name = store.new_name(time.time() + 0.001)
        staging = base / f".partial-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        self._record(containers, [])
        began = time.monotonic()
        try:
            parents = {c.name: self._parent(c, staging, previous) for c in containers}
            hows, pause = self._frozen_dumps(containers, staging, parents)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self.release()
            for c in containers:  # untracked, no injected fd left, whatever happened
                if (started := procfs.starttime_or_none(c.pid)) is not None:
                    _restore_source(c.pid, started, None)
            if isinstance(exc, (CheckpointError, TrackingError, podruntime.PodRuntimeError, OSError)):
                raise CheckpointError(f"checkpoint of pod {self.pod} failed: {exc}; earlier checkpoints "
                                      "are intact and the pod runs") from None
            raise
        meta = {"name": name, "time": _iso(time.time()), "size": store.dir_size(staging),
                "layers": max(store.chain_depth(staging / c.name) for c in containers),
                "containers": [c.name for c in containers], "how": hows, "pauseMs": round(pause * 1000, 1),
                "seconds": round(time.monotonic() - began, 3)}
        store.write_meta(staging, meta)
        os.rename(staging, base / name)
        pruned = store.prune(self.id, retention)
        if pruned:
            log.info("checkpoint %s of %s: pruned %s", self.id, self.pod, ", ".join(pruned))
        fresh = json.loads((base / name / store.META).read_text())  # pruning may have merged it
        return {**meta, "size": fresh["size"], "layers": fresh["layers"], "pruned": pruned}

    def _parent(self, c: PodContainer, staging: Path, previous: str | None) -> Path | None:
        """The image this container's dump builds on: the previous checkpoint while its
        trackers live on, else a new memsnap layer of all memory (trackers armed, then resumed
        and the injected fd closed in the tasks)."""
        t = self.tracked.get(c.name)
        if (t is not None and previous is not None and t.container_id == c.id and t.pid == c.pid
                and (prev := store.final_dir(self.id, previous, c.name)).is_dir()):
            return prev
        self._release(c.name)
        try:
            layer = precopy.write(c.pid, staging / (c.name + store.PRE), None)
        except TrackingError as exc:  # e.g. a task with a userfaultfd of its own: dumped whole, untracked
            log.warning("checkpoint %s: container %s cannot be tracked (%s): a full dump", self.id, c.name, exc)
            return None
        t = Tracked(c.id, c.pid)
        self.tracked[c.name] = t
        for pid in [c.pid] + procfs.descendants(c.pid):
            if registry.parked_backend(pid):
                try:
                    tracker = registry.resume(pid, VmaSelection())
                except TargetGone:
                    if pid == c.pid:
                        raise
                    continue
                except (TrackingError, OSError):
                    if pid == c.pid or procfs.alive(pid):
                        raise
                    continue
                t.trackers[pid] = tracker
        for tracker in t.trackers.values():
            if isinstance(tracker, UffdWp):  # CRIU cannot dump it; other backends inject nothing
                tracker.drop_target_fd()
        return layer

    def _frozen_dumps(self, containers: list[PodContainer], staging: Path,
                      parents: dict[str, Path | None]) -> tuple[dict[str, str], float]:
        freezers = [podruntime.freezer(c) for c in containers]
        self._record(containers, freezers)  # before freezing: a dead agent's successor thaws them
        hows: dict[str, str] = {}
        tracked = [pid for c in containers if c.name in self.tracked for pid in self.tracked[c.name].trackers]
        flags = EarlyVmFlags(tracked, staging)
        try:
            flags.read()
            began = time.monotonic()
            try:
                for f in freezers:
                    f.freeze()
                kept = flags.settle()
                for c in containers:
                    hows[c.name] = self._dump(c, staging, parents[c.name], c is containers[0], flags, kept)
            finally:
                for f in freezers:
                    f.thaw()
                pause = time.monotonic() - began
                self._record(containers, [])
        finally:
            flags.close()
        return hows, pause

    def _dump(self, c: PodContainer, staging: Path, parent: Path | None, pack: bool,
              flags: EarlyVmFlags, kept: list[int]) -> str:
        """runc checkpoint of the frozen container against parent: only what was written since
        when every task the parent names is tracked (uffd-wp), else every page (and the
        container's tracking starts over at the next checkpoint)."""
        work = staging / f".{c.name}.work"
        work.mkdir(mode=0o700, exist_ok=True)
        pids = [c.pid] + procfs.descendants(c.pid)
        t = self.tracked.get(c.name) or Tracked(c.id, c.pid)
        for pid in [p for p, tr in t.trackers.items() if p not in pids or not procfs.alive(p, tr.starttime)]:
            t.trackers.pop(pid).close()
        ids = procfs.image_ids(c.pid, pids)
        delta = (parent is not None and c.pid in t.trackers and _parent_tasks_tracked(parent, ids, t.trackers)
                 and all(isinstance(tr, UffdWp) for tr in t.trackers.values())
                 and (parent / "inventory.img").is_file() and criu.has_uffd_tracking())
        with LayerWriter(staging / c.name) as out:
            began = time.monotonic()
            if delta:
                for pid, tr in t.trackers.items():
                    tr.hand_over(described_in(parent, ids[pid]))
                podruntime.checkpoint(c, out.dir, work, parent, ["track-mem-uffd", *flags.criu_options()])
                written = sum(tr.written().pages for tr in t.trackers.values())
                for tr in t.trackers.values():
                    tr.collect()  # re-protect while frozen: the next dump sees every write from now
                how = (f"delta on {_rel(parent)} (CRIU --track-mem-uffd; {written} pages written since; "
                       f"VMA flags {flags.describe(pids, kept)})")
            else:
                self._release(c.name)
                podruntime.checkpoint(c, out.dir, work, None)
                how = "every page (no tracked chain to build on)"
            if pack and podruntime.pack_empty_dirs(self.uid, out.dir / podruntime.EMPTY_DIR_ARCHIVE):
                how += "; the pod's emptyDir volumes packed beside it"  # memsnap-runc unpacks them
            rel = os.path.relpath(parent, out.target) if delta else None
            manifest = Manifest(kind="final", parent=rel, pids=sorted(pids), backend="runc", pages=0, bytes=0,
                                described_pages=0, seconds=round(time.monotonic() - began, 6), how=how)
            out.commit(manifest)
        shutil.rmtree(work, ignore_errors=True)
        if not delta and parent is not None and parent.name.endswith(store.PRE):
            shutil.rmtree(parent, ignore_errors=True)  # the full dump needs no layer below it
        return how

    # -- tracking and recovery ------------------------------------------------------------

    def _release(self, name: str) -> None:
        t = self.tracked.pop(name, None)
        for tr in (t.trackers.values() if t else []):
            try:
                tr.close()
            except (TrackingError, OSError) as exc:
                log.error("could not release tracking of pid %d: %s", tr.pid, exc)

    def release(self) -> None:
        for name in list(self.tracked):
            self._release(name)

    def _record(self, containers: list[PodContainer], freezers: list[cgroupfs.Freezer]) -> None:
        data = {"pod": {"namespace": self.namespace, "name": self.name, "uid": self.uid},
                "pids": [[p, procfs.read_stat(p).starttime] for c in containers
                         for p in [c.pid] + procfs.descendants(c.pid) if procfs.alive(p)],
                "freezers": [[str(f.path), f.v2] for f in freezers]}
        path = store.root(self.id) / store.RECORD
        tmp = path.with_name(f".{store.RECORD}.tmp")
        tmp.write_text(json.dumps(data))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


def recover() -> list[str]:
    """At agent start: no pod stays frozen, no tracker's fd stays in a task, no half-written
    checkpoint stays, for whatever an earlier agent left. The checkpoints themselves stay."""
    done = []
    if not store.ROOT.is_dir():
        return done
    for d in sorted(store.ROOT.iterdir()):
        for partial in d.glob(".partial-*"):
            shutil.rmtree(partial, ignore_errors=True)
        try:
            rec = json.loads((d / store.RECORD).read_text())
        except (OSError, ValueError):
            continue
        try:
            for path, v2 in rec.get("freezers", []):
                f = cgroupfs.Freezer(Path(path), bool(v2))
                if f.path.exists() and f.frozen():
                    f.thaw()
                    done.append(f"thawed {path}, frozen by checkpoint {d.name} of an earlier agent")
            for pid, starttime in rec.get("pids", []):
                if procfs.alive(int(pid), int(starttime)) and registry.parked_backend(int(pid)):
                    registry.resume(int(pid), VmaSelection()).close()
                    done.append(f"released the tracking checkpoint {d.name} left in pid {pid}")
        except Exception as exc:  # noqa: BLE001 - recover the others
            done.append(f"could not recover checkpoint {d.name}: {exc}")
    return done


def _rel(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
