"""The target half of a migration: receive layers, restore, hold the restored workload until
the source commits, or remove every trace of it.

Each incoming migration lives in /var/lib/memsnap/incoming/<id>/ (root-only) with a state file.
Until the source commits, the restored workload is provisional: an abort, a source that stops
talking for LEASE seconds, or an agent restart kills it and deletes the images.

The restore is lazy (unless MEMSNAP_LAZY_RESTORE=0): CRIU restores the process state and the
pages of the last delta, the workload runs, and `criu lazy-pages` fills the pre-copied memory in
from the local chain in the background. The commit waits for that fill: a fill that fails
kills the restored copy and the commit is refused, so the source, still frozen, thaws its own.
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import cgroupfs, containers, procfs
from ..checkpoint import criu, lazy
from ..checkpoint import restore as chain_restore
from . import podtarget, transfer

log = logging.getLogger(__name__)

INCOMING = Path("/var/lib/memsnap/incoming")
LEASE = 20.0  # seconds of silence from the source after which an uncommitted migration aborts
# A commit waits this long for the background fill (~2.4 GiB/s here): under the source's read
# timeout between agents (60 s on this branch, 15 s of peer silence on main since fcb7ee4).
FILL_TIMEOUT = 12.0
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
    message: str = ""
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def dir(self) -> Path:
        return INCOMING / self.id


@dataclass
class Fill:
    """The lazy-pages daemon filling a restored workload's memory in the background."""
    proc: subprocess.Popen
    log: Path
    began: float
    lazy_pages: int

    def wait(self, timeout: float) -> tuple[float, str]:
        """Seconds the fill took (from the restore on), and "" or why it failed."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return time.monotonic() - self.began, f"the background fill did not finish in {timeout:.0f} s"
        took = time.monotonic() - self.began
        if rc != 0:
            how = f"was killed by signal {-rc}" if rc < 0 else f"failed (exit {rc})"
            return took, f"the background fill (criu lazy-pages) {how}: {criu._tail(self.log)}".rstrip(": ")
        return took, ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Target:
    """Every incoming migration of this node's agent."""

    def __init__(self, root: Path = INCOMING):
        self.root = root
        self.active: dict[str, Incoming] = {}
        self.fills: dict[str, Fill] = {}  # lazy restores still filling or not yet committed
        self.committing: set[str] = set()  # waiting for their fill: the lease does not run
        self.committed_pods: dict[str, str] = {}  # pod migration id -> source, once committed

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
        done = inc.dir / layer / name
        if (inc.dir / layer).exists():
            return done.stat().st_size if done.exists() else None
        return transfer.held(inc.dir, layer, name)

    async def receive(self, inc: Incoming, layer: str, name: str, offset: int, content) -> int:
        _check_layer(inc, layer)
        _check(FILE, name, "file name")
        self._receiving(inc)
        try:
            return await transfer.receive_file(inc.dir, layer, name, offset, content)
        except transfer.NoSpace as exc:
            raise TargetError(str(exc), 507) from None
        except transfer.TransferError as exc:
            raise TargetError(str(exc), 409) from None

    def commit_layer(self, inc: Incoming, layer: str, manifest_json: str) -> None:
        _check_layer(inc, layer)
        self._receiving(inc)
        try:
            transfer.commit_layer(inc.dir, layer, manifest_json, set(inc.layers))
        except transfer.TransferError as exc:
            raise TargetError(str(exc), 422) from None
        except OSError as exc:
            raise TargetError(f"cannot store layer {layer}: {exc.strerror}", 507) from None
        inc.layers.append(layer)
        self._save(inc)

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
            podtarget.mark_ready(inc, layer)
            inc.state = "restoring"
            self._save(inc)
            return {"state": inc.state}
        began = time.monotonic()
        try:
            pid, fill = restore_container(inc.dir / layer, inc.container, lazy_restore_enabled())
        except (criu.CriuError, chain_restore.LayerError, containers.ContainerError, OSError) as exc:
            raise TargetError(f"restore failed on this node: {exc}", 500) from None
        inc.pid, inc.starttime, inc.state = pid, procfs.read_stat(pid).starttime, "restored"
        if fill is not None:
            self.fills[inc.id] = fill
        self._save(inc)
        restored_at = time.monotonic()
        if not confirm_running(pid, inc.starttime):
            _kill_restored(inc)
            self._stop_fill(inc)
            raise TargetError(f"the restored workload (pid {pid}) does not run", 500)
        if inc.container:
            containers.save(containers.Container(inc.container, pid, inc.starttime, inc.argv, "/dev/null"))
        return {"pid": pid, "restore_seconds": round(restored_at - began, 6),
                "confirm_seconds": round(time.monotonic() - restored_at, 6),
                "lazy": fill is not None, "lazy_pages": fill.lazy_pages if fill else 0}

    def commit(self, inc: Incoming) -> dict:
        """The source has handed over: once the background fill is done, the workload is ours
        and its images are not needed. A failed fill kills the restored copy and refuses."""
        if inc.state != "restored":
            raise TargetError(f"migration {inc.id} has nothing restored to commit", 409)
        fill_seconds = self._wait_fill(inc)
        if inc.pod:
            self.committed_pods = {**dict(list(self.committed_pods.items())[-999:]), inc.id: inc.source}
        inc.state = "committed"
        self.active.pop(inc.id, None)
        shutil.rmtree(inc.dir, ignore_errors=True)
        return {"fill_seconds": round(fill_seconds, 6)}

    def _wait_fill(self, inc: Incoming) -> float:
        fill = self.fills.get(inc.id)
        if fill is None:
            return 0.0
        self.committing.add(inc.id)
        try:
            took, failed = fill.wait(FILL_TIMEOUT)
        finally:
            self.committing.discard(inc.id)
            inc.last_seen = time.monotonic()
        if failed:
            self.abort(inc, failed)
            inc.state = "failed"
            raise TargetError(f"{failed}; the restored workload was killed on this node", 500)
        self.fills.pop(inc.id, None)
        return took

    def abort(self, inc: Incoming, why: str) -> None:
        """Remove every trace: the restored workload (if any), its fill, the images, the record."""
        log.warning("migration %s from %s aborted: %s", inc.id, inc.source, why)
        if inc.pod:
            podtarget.poll(inc)  # a container restored meanwhile is killed too
        if inc.state in ("restored", "restoring", "failed") and inc.pod:
            _kill_restored(inc)
        elif inc.state == "restored":
            _kill_restored(inc)
        self._stop_fill(inc)
        self.active.pop(inc.id, None)
        shutil.rmtree(inc.dir, ignore_errors=True)

    def _stop_fill(self, inc: Incoming) -> None:
        fill = self.fills.pop(inc.id, None)
        if fill is not None:  # after the kill: a daemon whose tasks are gone has nothing to do
            fill.stop()

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for inc in list(self.active.values()):
            if inc.id not in self.committing and now - inc.last_seen > LEASE:
                self.abort(inc, f"no word from {inc.source} for {LEASE:.0f} s")

    def status(self, inc: Incoming) -> dict:
        if inc.pod:
            before = inc.state
            podtarget.poll(inc)
            if inc.state != before:
                self._save(inc)
            return {"id": inc.id, "state": inc.state, "layers": inc.layers, "message": inc.message,
                    "results": inc.results, "pids": inc.pids}
        return {"id": inc.id, "state": inc.state, "layers": inc.layers, "pid": inc.pid}

    def _receiving(self, inc: Incoming) -> None:
        if inc.state != "receiving":
            raise TargetError(f"migration {inc.id} is {inc.state}, not receiving", 409)

    def _save(self, inc: Incoming) -> None:
        data = {k: v for k, v in asdict(inc).items() if k != "last_seen"}
        tmp = inc.dir / ".state.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, inc.dir / ".state.json")


def _check(pattern: re.Pattern, value: str, what: str) -> None:
    if not pattern.match(value or ""):
        raise TargetError(f"bad {what} {value!r}")


def _load_state(d: Path) -> Incoming | None:
    try:
        return Incoming(**json.loads((d / ".state.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


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


def restore_container(layer: Path, name: str, lazy_fill: bool = False) -> tuple[int, Fill | None]:
    """criu restore of the chain, the restored tree in container name's cgroups (a fresh set,
    not the one it was dumped from), detached; returns its pid as this node sees it and, with
    lazy_fill, the daemon filling its memory in."""
    paths = containers.make_cgroups(name) if name else {}
    preexec = containers.join_cgroups_fn(paths) if paths else None
    with tempfile.TemporaryDirectory(prefix="memsnap-restore-") as work:
        pidfile = Path(work) / "pid"
        if not lazy_fill:
            newest = chain_restore.verify(layer)[0].dir
            criu.restore(newest, pidfile, Path(work), preexec_fn=preexec)
            return int(pidfile.read_text()), None
        return _restore_lazy(_received_chain(layer), pidfile, Path(work), preexec)


def _received_chain(layer: Path) -> Path:
    """The newest layer of a received chain, its links checked. Not its checksums nor every
    page reference, which cost time in proportion to memory, during the pause: every file was
    checked against its manifest on receipt, and a page the chain lacks fails CRIU's restore or
    the background fill, which rolls the migration back."""
    return chain_restore.verify(layer, thorough=False)[0].dir


def _restore_lazy(newest: Path, pidfile: Path, work: Path, preexec) -> tuple[int, Fill]:
    # The in-parent pages (the pre-copied memory) become lazy too: restore reads only the delta.
    lazy.mark_parent_pages_lazy(newest)
    log_path = newest.parent / "lazy-pages.log"  # beside the chain: goes with it
    proc = criu.start_lazy_pages(newest, log_path)
    try:
        criu.restore_lazy(newest, pidfile, work, preexec_fn=preexec)
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
