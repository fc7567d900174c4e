"""The target half of a migration: receive layers, restore, hold the restored workload until
the source commits, or remove every trace of it.

Each incoming migration lives in /var/lib/memsnap/incoming/<id>/ (root-only) with a state file.
Until the source commits, the restored workload is provisional: an abort, a source that stops
talking for LEASE seconds, or an agent restart kills it and deletes the images.

The restore is lazy (unless MEMSNAP_LAZY_RESTORE=0): CRIU restores the process state and the
pages of the last delta, the workload runs, and `criu lazy-pages` fills the pre-copied memory in
from the local chain in the background. The source's commit is answered within
COMMIT_ANSWER seconds, "filling" with the fill's progress while it runs; the source asks again
(which keeps the link and the lease alive) until it is "committed". A fill that fails, stalls or
outlasts fill_bound() (which grows with the memory to fill) kills the restored copy and the
commit is refused, so the source, still frozen, thaws its own.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import cgroupfs, containers, procfs
from ..checkpoint import criu, lazy
from ..checkpoint import restore as chain_restore
from ..images.flat import FlatChain
from ..images.layer import LayerError
from ..kernel.pagemap import PAGE_SIZE
from . import podtarget, transfer

log = logging.getLogger(__name__)

INCOMING = Path("/var/lib/memsnap/incoming")
LEASE = 20.0  # seconds of silence from the source after which an uncommitted migration aborts
# A commit answers within this, well under the source's 15 s of peer silence (api.PEER_SILENCE).
COMMIT_ANSWER = 5.0
# The background fill runs at ~2.4 GiB/s here; it may take FILL_BASE + FILL_PER_GIB per GiB it
# fills (a fill 70x slower than that still ends), and must fill something every FILL_STALL s.
FILL_BASE, FILL_PER_GIB, FILL_STALL = 30.0, 30.0, 20.0
KEEP_OUTCOME = 600.0  # s a committed or failed migration still answers what became of it
ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
LAYER = re.compile(r"^(l[0-9]{1,4}|final)$")
FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TargetError(Exception):
    """A request the target refuses; status is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Incoming:
    id: str
    source: str  # the node it comes from (as its certificate names it)
    container: str
    argv: list[str] = field(default_factory=list)
    memory_bytes: int = 0
    state: str = "receiving"  # receiving, restored, committed, failed
    layers: list[str] = field(default_factory=list)
    pid: int = 0
    starttime: int = 0
    # a pod migration (podtarget.py): the wrapper restores its containers, not this agent
    pod: dict = field(default_factory=dict)
    containers: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)  # container -> the wrapper's outcome
    pids: dict = field(default_factory=dict)  # container -> [pid, starttime] once restored
    commit_asked: bool = False  # the source handed over: commit once the fill is in
    message: str = ""  # why it failed
    ended: bool = False  # aborted and cleared: only the outcome is kept, for a while
    fill_seconds: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def dir(self) -> Path:
        return INCOMING / self.id


def fill_bound(lazy_bytes: int) -> float:
    """Seconds a background fill of lazy_bytes may take."""
    return FILL_BASE + FILL_PER_GIB * lazy_bytes / (1 << 30)


@dataclass
class Fill:
    """The lazy-pages daemon filling a restored workload's memory in the background. Its
    progress is the restored tree's resident anonymous memory: a lazy page is resident once in."""
    proc: subprocess.Popen
    log: Path
    began: float
    lazy_pages: int
    pid: int = 0  # the restored tree's root, once known (watch())
    resident0: int = 0
    filled: int = 0  # bytes the tree's resident memory grew by since the restore (at most)
    moved_at: float = 0.0
    took: float | None = None  # seconds from the restore to the end of the fill, once ended
    failed: str = ""  # why it failed, once ended
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def lazy_bytes(self) -> int:
        return self.lazy_pages * PAGE_SIZE

    def watch(self, pid: int) -> None:
        self.pid, self.resident0, self.moved_at = pid, _resident_anon(pid), time.monotonic()

    def poll(self) -> bool:
        """Whether the fill has ended (took and failed say how). A fill over its bound, or that
        filled nothing for FILL_STALL s, is stopped here and has failed."""
        with self.lock:
            if self.took is not None:
                return True
            rc, now = self.proc.poll(), time.monotonic()
            if rc is not None:
                how = f"was killed by signal {-rc}" if rc < 0 else f"failed (exit {rc})"
                why = f"the background fill (criu lazy-pages) {how}: {criu._tail(self.log)}".rstrip(": ")
                return self._end(now, why if rc else "")
            grown = _resident_anon(self.pid) - self.resident0 if self.pid else 0
            if grown > self.filled:
                self.filled, self.moved_at = grown, now
            bound = fill_bound(self.lazy_bytes)
            if now - self.began > bound:
                return self._end(now, f"the background fill did not finish in {bound:.0f} s ({self._done()})")
            if now - max(self.moved_at, self.began) > FILL_STALL:
                return self._end(now, f"the background fill filled nothing for {FILL_STALL:.0f} s ({self._done()})")
            return False

    def _end(self, now: float, failed: str) -> bool:
        if failed and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.took, self.failed = now - self.began, failed
        return True

    def _done(self) -> str:
        return f"{self.filled >> 20} of {self.lazy_bytes >> 20} MiB in"

    def wait(self, timeout: float) -> bool:
        """Whether the fill ended within timeout."""
        deadline = time.monotonic() + timeout
        while not self.poll():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.proc.wait(min(left, 0.25))
            except subprocess.TimeoutExpired:
                pass
        return True

    def progress(self) -> dict:
        return {"filled_bytes": min(self.filled, self.lazy_bytes), "lazy_bytes": self.lazy_bytes,
                "fill_seconds": round(time.monotonic() - self.began if self.took is None else self.took, 3),
                "bound_seconds": round(fill_bound(self.lazy_bytes), 1)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class PodFills:
    """The fills of a pod's containers (one lazy-pages daemon each), as one Fill."""
    parts: dict[str, Fill] = field(default_factory=dict)  # container -> its fill

    def restored(self, inc: Incoming) -> None:
        """The wrapper restored every container: each fill's clock, size and tree start now."""
        for name, fill in self.parts.items():
            fill.began, fill.lazy_pages = time.monotonic(), criu.restored_lazy_pages(inc.dir / name)
            fill.watch(int((inc.pids or {}).get(name, [0])[0]))

    @property
    def took(self) -> float | None:
        took = [f.took for f in self.parts.values()]
        return None if None in took else max(took, default=0.0)

    @property
    def failed(self) -> str:
        return next((f"container {n}: {f.failed}" for n, f in self.parts.items() if f.failed), "")

    def poll(self) -> bool:
        return all([f.poll() for f in self.parts.values()])  # a list: poll each

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(f.wait(max(0.0, deadline - time.monotonic())) for f in self.parts.values())

    def progress(self) -> dict:
        each = [f.progress() for f in self.parts.values()]
        return {"filled_bytes": sum(p["filled_bytes"] for p in each), "lazy_bytes": sum(p["lazy_bytes"] for p in each),
                "fill_seconds": max((p["fill_seconds"] for p in each), default=0.0),
                "bound_seconds": max((p["bound_seconds"] for p in each), default=0.0)}

    def stop(self) -> None:
        for fill in self.parts.values():
            fill.stop()


class Target:
    """Every incoming migration of this node's agent."""

    def __init__(self, root: Path = INCOMING):
        self.root = root
        self.active: dict[str, Incoming] = {}
        self.fills: dict[str, Fill | PodFills] = {}  # lazy restores still filling or not yet committed
        self.committed_pods: dict[str, str] = {}  # pod migration id -> source, once committed
        # migration id -> its chains' pre-copy layers merged as they arrive, by layer-name prefix
        self.flats: dict[str, dict[str, FlatChain]] = {}
        self.merge_seconds: dict[tuple[str, str], float] = {}  # (migration, layer) -> its merge, for the pause's account
        self.lock = threading.Lock()  # commits, the lease keeper and aborts settle one at a time

    # -- lifecycle ---------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """At agent start: whatever an earlier agent left uncommitted goes (workload and images)."""
        done = []
        if not self.root.is_dir():
            return done
        for d in sorted(self.root.iterdir()):
            inc = _load_state(d)
            if inc is not None and inc.state in ("restored", "restoring"):
                _kill_restored(inc)
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"removed incoming migration {d.name} left by an earlier agent")
        return done

    def create(self, mig_id: str, source: str, container: str, argv: list[str], memory_bytes: int,
               pod: dict | None = None, pod_containers: list[str] | None = None) -> Incoming:
        _check(ID, mig_id, "migration id")
        if pod:
            return self._create_pod(mig_id, source, pod, pod_containers or [], memory_bytes)
        if container:
            containers.check_name(container)
        if mig_id in self.active:
            raise TargetError(f"migration {mig_id} already exists", 409)
        running = containers.load(container) if container else None
        if running is not None and running.running:
            raise TargetError(f"a container named {container!r} already runs on this node", 409)
        inc = Incoming(mig_id, source, container, list(argv), memory_bytes)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        inc.dir.mkdir(mode=0o700)
        self.active[mig_id] = inc
        self._save(inc)
        return inc

    def _create_pod(self, mig_id: str, source: str, pod: dict, names: list[str], memory_bytes: int) -> Incoming:
        if not names:
            raise TargetError("a pod migration needs at least one container")
        for name in names:
            if not podtarget.CONTAINER.match(name):
                raise TargetError(f"bad container name {name!r}")
        if mig_id in self.active:
            raise TargetError(f"migration {mig_id} already exists", 409)
        inc = Incoming(mig_id, source, "", [], memory_bytes, pod=dict(pod), containers=list(names))
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        inc.dir.mkdir(mode=0o700)
        self.active[mig_id] = inc
        self._save(inc)
        return inc

    def get(self, mig_id: str, source: str) -> Incoming:
        inc = self.active.get(mig_id)
        if inc is None and self.committed_pods.get(mig_id) == source:  # a commit whose answer was lost
            raise TargetError(f"migration {mig_id} was committed on this node", 410)
        if inc is None:
            raise TargetError(f"no migration {mig_id} on this node", 404)
        if inc.source != source:  # only the node that started it may drive it
            raise TargetError(f"migration {mig_id} belongs to {inc.source}, not {source}", 403)
        inc.last_seen = time.monotonic()
        return inc

    # -- layers ------------------------------------------------------------------------------

    def held(self, inc: Incoming, layer: str, name: str) -> int | None:
        """Bytes of the file held so far; None when there is no such file yet."""
        _check_layer(inc, layer)
        _check(FILE, name, "file name")
        self._receiving(inc)
        done = inc.dir / layer / name
        if (inc.dir / layer).exists():
            return done.stat().st_size if done.exists() else None
        return transfer.held(inc.dir, layer, name)

    async def receive(self, inc: Incoming, layer: str, name: str, offset: int, content) -> int:
        _check_layer(inc, layer)
        _check(FILE, name, "file name")
        self._receiving(inc)
        try:
            return await transfer.receive_file(inc.dir, layer, name, offset, _Renewing(content, inc))
        except transfer.NoSpace as exc:
            raise TargetError(str(exc), 507) from None
        except transfer.TransferError as exc:
            raise TargetError(str(exc), 409) from None
        except OSError:
            self._receiving(inc)  # aborted meanwhile: say so
            raise

    def commit_layer(self, inc: Incoming, layer: str, manifest_json: str) -> None:
        _check_layer(inc, layer)
        self._receiving(inc)
        try:
            transfer.commit_layer(inc.dir, layer, manifest_json, set(inc.layers), durable=False)
        except transfer.TransferError as exc:
            raise TargetError(str(exc), 422) from None
        except OSError as exc:
            raise TargetError(f"cannot store layer {layer}: {exc.strerror}", 507) from None
        inc.layers.append(layer)
        self._save(inc)
        self._flatten(inc, layer)

    def _flatten(self, inc: Incoming, layer: str) -> None:
        """A pre-copy layer is merged into its chain's flat image; a layer on top of one (the
        final) is linked to it, so that a restore reads a few small pagemaps, not every round's."""
        prefix, precopy = _chain_of(layer)
        flat = self.flats.setdefault(inc.id, {}).setdefault(prefix, FlatChain(inc.dir, prefix))
        began = time.monotonic()
        try:
            if precopy:
                flat.add(inc.dir / layer)
            else:
                flat.relink(inc.dir / layer)
                self.merge_seconds[(inc.id, layer)] = round(time.monotonic() - began, 6)
        except (LayerError, ValueError) as exc:
            raise TargetError(f"cannot merge layer {layer}: {exc}", 422) from None
        except OSError as exc:
            raise TargetError(f"cannot merge layer {layer}: {exc.strerror}", 507) from None

    # -- restore, commit, abort ---------------------------------------------------------------

    def restore(self, inc: Incoming, layer: str) -> dict:
        """Restore the chain ending at layer as the migration's container; confirm it runs.
        A pod migration's container is only marked ready here: memsnap-runc restores it and
        status() reports how that went."""
        _check_layer(inc, layer)
        if inc.pod and inc.state == "restoring":
            inc.state = "receiving"  # the next container of the pod
        self._receiving(inc)
        if layer not in inc.layers:
            raise TargetError(f"layer {layer} was not received", 409)
        if inc.pod:
            if lazy_restore_enabled():
                self._serve_lazily(inc, layer)
            podtarget.mark_ready(inc, layer)
            inc.state = "restoring"
            self._save(inc)
            return {"state": inc.state}
        began = time.monotonic()
        phases: dict[str, float] = {}
        try:
            pid, fill = restore_container(inc.dir / layer, inc.container, lazy_restore_enabled(), phases)
        except (criu.CriuError, LayerError, containers.ContainerError, OSError) as exc:
            raise TargetError(f"restore failed on this node: {exc}", 500) from None
        inc.pid, inc.starttime, inc.state = pid, procfs.read_stat(pid).starttime, "restored"
        if fill is not None:
            fill.watch(pid)
            self.fills[inc.id] = fill
        self._save(inc)
        restored_at = time.monotonic()
        if not confirm_running(pid, inc.starttime):
            _kill_restored(inc)
            self._stop_fill(inc)
            raise TargetError(f"the restored workload (pid {pid}) does not run", 500)
        if inc.container:
            containers.save(containers.Container(inc.container, pid, inc.starttime, inc.argv, "/dev/null"))
        return {"pid": pid, "restore_seconds": round(restored_at - began, 6), "restore_phases": phases,
                "merge_seconds": self.merge_seconds.pop((inc.id, layer), 0.0),
                "confirm_seconds": round(time.monotonic() - restored_at, 6),
                "lazy": fill is not None, "lazy_pages": fill.lazy_pages if fill else 0}

    def _serve_lazily(self, inc: Incoming, layer: str) -> None:
        """A pod's container is restored by memsnap-runc, reading only the last delta when this
        node serves the rest: `criu lazy-pages` in the images' directory (its socket where the
        restoring CRIU looks: the wrapper makes that directory runc's work path), which then fills
        the pre-copied pages in the background, watched as a process's fill is."""
        directory = inc.dir / layer
        try:
            proc, log_path = start_fill(directory)
        except (criu.CriuError, OSError) as exc:
            raise TargetError(f"cannot serve container {layer}'s memory on this node: {exc}", 500) from None
        group = self.fills.setdefault(inc.id, PodFills())
        group.parts[layer] = Fill(proc, log_path, time.monotonic(), 0)
        podtarget.mark_lazy(inc, layer)

    def commit(self, inc: Incoming, wait: float = COMMIT_ANSWER) -> dict:
        """The source has handed over: once the background fill is in, the workload is ours and
        its images are not needed. Answers within wait: "filling" (with the fill's progress)
        while it runs, and the source asks again. A failed fill has killed the restored copy:
        refused. Asking again after the outcome gets the same outcome."""
        if inc.state == "restored":
            inc.commit_asked = True
            fill = self.fills.get(inc.id)
            if fill is not None and not fill.wait(wait):
                return {"state": "filling", **fill.progress()}
            self.settle(inc)
        if inc.state == "committed":
            return {"state": "committed", "fill_seconds": round(inc.fill_seconds, 6)}
        if inc.state == "failed":
            raise TargetError(f"{inc.message}; the restored workload was killed on this node", 500)
        raise TargetError(f"migration {inc.id} has nothing restored to commit", 409)

    def settle(self, inc: Incoming) -> None:
        """A restored migration whose fill has ended: failed (the copy is killed), or committed
        if the source asked for it."""
        with self.lock:
            fill = self.fills.get(inc.id)
            if inc.state != "restored" or (fill is not None and not fill.poll()):
                return
            if fill is not None and fill.failed:
                self.abort(inc, fill.failed, keep_outcome=True)
            elif inc.commit_asked:
                self.fills.pop(inc.id, None)
                self.flats.pop(inc.id, None)
                inc.state, inc.fill_seconds = "committed", fill.took if fill else 0.0
                if inc.pod:  # asked again once its record is gone: 410, not 404 (see get)
                    self.committed_pods = {**dict(list(self.committed_pods.items())[-999:]), inc.id: inc.source}
                shutil.rmtree(inc.dir, ignore_errors=True)

    def abort(self, inc: Incoming, why: str, keep_outcome: bool = False) -> None:
        """Remove every trace: the restored workload (if any), its fill, the images, and the
        record (unless keep_outcome: it then answers "failed", why, for a while)."""
        if inc.state == "committed" or inc.ended:  # nothing left to remove
            self.active.pop(inc.id, None)
            return
        log.warning("migration %s from %s aborted: %s", inc.id, inc.source, why)
        if inc.pod:
            podtarget.poll(inc)  # a container restored meanwhile is killed too
        if inc.state in ("restored", "restoring", "failed") and inc.pod:
            _kill_restored(inc)
        elif inc.state == "restored":
            _kill_restored(inc)
        self._stop_fill(inc)
        shutil.rmtree(inc.dir, ignore_errors=True)
        inc.state, inc.message, inc.ended = "failed", why, True
        if not keep_outcome:
            self.active.pop(inc.id, None)

    def _stop_fill(self, inc: Incoming) -> None:
        self.flats.pop(inc.id, None)
        for key in [k for k in self.merge_seconds if k[0] == inc.id]:
            del self.merge_seconds[key]
        fill = self.fills.pop(inc.id, None)
        if fill is not None:  # after the kill: a daemon whose tasks are gone has nothing to do
            fill.stop()

    def expire(self, now: float | None = None) -> None:
        """The lease keeper's round: ended fills settle; a source silent for LEASE s loses
        what it has not committed (even while the fill runs: the source keeps asking)."""
        for inc in list(self.active.values()):
            silent = (time.monotonic() if now is None else now) - inc.last_seen
            if inc.state == "committed" or inc.ended:
                if silent > KEEP_OUTCOME:
                    self.active.pop(inc.id, None)
                continue
            self.settle(inc)
            if inc.state != "committed" and not inc.ended and silent > LEASE:
                with self.lock:
                    self.abort(inc, f"no word from {inc.source} for {LEASE:.0f} s", keep_outcome=True)

    def status(self, inc: Incoming) -> dict:
        if inc.pod:
            before = inc.state
            podtarget.poll(inc)
            fill = self.fills.get(inc.id)
            if inc.state != before:
                if inc.state == "restored" and isinstance(fill, PodFills):
                    fill.restored(inc)
                self._save(inc)
            return {"id": inc.id, "state": inc.state, "layers": inc.layers, "message": inc.message,
                    "results": inc.results, "pids": inc.pids,
                    **(fill.progress() if fill is not None and inc.state == "restored" else {})}
        fill = self.fills.get(inc.id)
        return {"id": inc.id, "state": inc.state, "layers": inc.layers, "pid": inc.pid,
                **({"message": inc.message} if inc.message else {}),
                **(fill.progress() if fill is not None and inc.state == "restored" else {})}

    def _receiving(self, inc: Incoming) -> None:
        if inc.state == "failed":
            raise TargetError(f"migration {inc.id} failed on this node: {inc.message}", 409)
        if inc.state != "receiving":
            raise TargetError(f"migration {inc.id} is {inc.state}, not receiving", 409)

    def _save(self, inc: Incoming) -> None:
        data = {k: v for k, v in asdict(inc).items() if k != "last_seen"}
        tmp = inc.dir / ".state.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, inc.dir / ".state.json")


class _Renewing:
    """A request body that renews its migration's lease with every chunk: one file of a big
    layer may take longer to arrive than the lease."""

    def __init__(self, content, inc: Incoming):
        self.content, self.inc = content, inc

    async def iter_chunked(self, n: int):
        async for chunk in self.content.iter_chunked(n):
            self.inc.last_seen = time.monotonic()
            yield chunk


def _check(pattern: re.Pattern, value: str, what: str) -> None:
    if not pattern.match(value or ""):
        raise TargetError(f"bad {what} {value!r}")


def _load_state(d: Path) -> Incoming | None:
    try:
        return Incoming(**json.loads((d / ".state.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _chain_of(layer: str) -> tuple[str, bool]:
    """(the prefix of the chain's layer names, whether it is a pre-copy layer): `l3` -> ("", True),
    `final` -> ("", False); a pod's `web.l3` -> ("web.", True), `web` -> ("web.", False)."""
    head, _, rest = layer.rpartition(".")
    if re.fullmatch(r"l[0-9]{1,4}", rest):
        return (f"{head}." if head else ""), True
    return ("" if layer == "final" else f"{layer}."), False


def _check_layer(inc: Incoming, layer: str) -> None:
    if inc.pod:
        if not podtarget.layer_ok(inc.containers, layer):
            raise TargetError(f"bad layer {layer!r}: not a container of this pod migration")
    else:
        _check(LAYER, layer, "layer")


def _kill_restored(inc: Incoming) -> None:
    if inc.pod:
        podtarget.kill_restored(inc)
    elif inc.container:  # everything in its cgroups, recorded or not
        containers.stop(inc.container)
    elif procfs.alive(inc.pid, inc.starttime):
        os.kill(inc.pid, signal.SIGKILL)


def lazy_restore_enabled() -> bool:
    return os.environ.get("MEMSNAP_LAZY_RESTORE", "1") != "0"


def restore_container(layer: Path, name: str, lazy_fill: bool = False,
                      phases: dict[str, float] | None = None) -> tuple[int, Fill | None]:
    """criu restore of the chain, the restored tree in container name's cgroups (a fresh set,
    not the one it was dumped from), detached; returns its pid as this node sees it and, with
    lazy_fill, the daemon filling its memory in. phases gets where a lazy restore's time went."""
    phases = {} if phases is None else phases
    paths = containers.make_cgroups(name) if name else {}
    preexec = containers.join_cgroups_fn(paths) if paths else None
    with tempfile.TemporaryDirectory(prefix="memsnap-restore-") as work:
        pidfile = Path(work) / "pid"
        if not lazy_fill:
            newest = chain_restore.verify(layer)[0].dir
            criu.restore(newest, pidfile, Path(work), preexec_fn=preexec)
            return int(pidfile.read_text()), None
        t = time.monotonic()
        newest = _received_chain(layer)
        phases["chain links"] = round(time.monotonic() - t, 6)
        return _restore_lazy(newest, pidfile, Path(work), preexec, phases)


def _received_chain(layer: Path) -> Path:
    """The newest layer of a received chain, its links checked. Not its checksums nor every
    page reference, which cost time in proportion to memory, during the pause: every file was
    checked against its manifest on receipt, and a page the chain lacks fails CRIU's restore or
    the background fill, which rolls the migration back."""
    return chain_restore.verify(layer, thorough=False)[0].dir


def start_fill(newest: Path, log_path: Path | None = None,
               phases: dict[str, float] | None = None) -> tuple[subprocess.Popen, Path]:
    """The lazy-pages daemon serving the chain ending at newest, its in-parent pages (the
    pre-copied memory) made lazy too, so that a restore reads only the delta. phases gets
    how long each step took."""
    t = time.monotonic()
    lazy.mark_parent_pages_lazy(newest)
    marked = time.monotonic()
    log_path = log_path or newest / "lazy-pages.log"
    proc = criu.start_lazy_pages(newest, log_path)
    if phases is not None:
        phases["lazy marks"] = round(marked - t, 6)
        phases["daemon start"] = round(time.monotonic() - marked, 6)
    return proc, log_path


def _restore_lazy(newest: Path, pidfile: Path, work: Path, preexec, phases: dict[str, float]) -> tuple[int, Fill]:
    proc, log_path = start_fill(newest, newest.parent / "lazy-pages.log", phases)  # beside the chain: goes with it
    t = time.monotonic()
    try:
        criu.restore_lazy(newest, pidfile, work, preexec_fn=preexec)
        phases["criu restore"] = round(time.monotonic() - t, 6)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    fill = Fill(proc, log_path, time.monotonic(), criu.restored_lazy_pages(work))
    return int(pidfile.read_text()), fill


def confirm_running(pid: int, starttime: int, settle: float = 0.05) -> bool:
    """Runs: alive, not stopped, not frozen, a moment after the restore returned."""
    time.sleep(settle)
    if not procfs.alive(pid, starttime):
        return False
    return procfs.read_stat(pid).state not in ("T", "t") and not _frozen(pid)


def _frozen(pid: int) -> bool:
    mounts, member = cgroupfs.hierarchies(), cgroupfs.membership(pid)
    if "freezer" in mounts:
        state = mounts["freezer"] / member.get("freezer", "/").lstrip("/") / "freezer.state"
        return state.exists() and state.read_text().strip() != "THAWED"
    return False


def _resident_anon(root: int) -> int:
    """Resident anonymous bytes of root's tree (RssAnon: kernel counters, no page walk)."""
    total = 0
    try:
        tree = [root] + procfs.descendants(root)
    except OSError:
        return 0
    for pid in tree:
        try:
            total += int(procfs.read_status(pid).get("RssAnon", "0 kB").split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return total
