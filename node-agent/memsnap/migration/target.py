"""The target half of a migration: receive layers, restore, hold the restored workload until
the source commits, or remove every trace of it.

Each incoming migration lives in /var/lib/memsnap/incoming/<id>/ (root-only) with a state file.
Until the source commits, the restored workload is provisional: an abort, a source that stops
talking for LEASE seconds, or an agent restart kills it and deletes the images.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import cgroupfs, containers, procfs
from ..checkpoint import criu
from ..checkpoint import restore as chain_restore
from . import transfer

log = logging.getLogger(__name__)

INCOMING = Path("/var/lib/memsnap/incoming")
LEASE = 20.0  # seconds of silence from the source after which an uncommitted migration aborts
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
    state: str = "receiving"  # receiving, restored, committed
    layers: list[str] = field(default_factory=list)
    pid: int = 0
    starttime: int = 0
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def dir(self) -> Path:
        return INCOMING / self.id


class Target:
    """Every incoming migration of this node's agent."""

    def __init__(self, root: Path = INCOMING):
        self.root = root
        self.active: dict[str, Incoming] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """At agent start: whatever an earlier agent left uncommitted goes (workload and images)."""
        done = []
        if not self.root.is_dir():
            return done
        for d in sorted(self.root.iterdir()):
            inc = _load_state(d)
            if inc is not None and inc.state == "restored":
                _kill_restored(inc)
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"removed incoming migration {d.name} left by an earlier agent")
        return done

    def create(self, mig_id: str, source: str, container: str, argv: list[str], memory_bytes: int) -> Incoming:
        _check(ID, mig_id, "migration id")
        containers.check_name(container) if container else None
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

    def get(self, mig_id: str, source: str) -> Incoming:
        inc = self.active.get(mig_id)
        if inc is None:
            raise TargetError(f"no migration {mig_id} on this node", 404)
        if inc.source != source:  # only the node that started it may drive it
            raise TargetError(f"migration {mig_id} belongs to {inc.source}, not {source}", 403)
        inc.last_seen = time.monotonic()
        return inc

    # -- layers ------------------------------------------------------------------------------

    def held(self, inc: Incoming, layer: str, name: str) -> int | None:
        """Bytes of the file held so far; None when there is no such file yet."""
        _check(LAYER, layer, "layer")
        _check(FILE, name, "file name")
        done = inc.dir / layer / name
        if (inc.dir / layer).exists():
            return done.stat().st_size if done.exists() else None
        return transfer.held(inc.dir, layer, name)

    async def receive(self, inc: Incoming, layer: str, name: str, offset: int, content) -> int:
        _check(LAYER, layer, "layer")
        _check(FILE, name, "file name")
        self._receiving(inc)
        try:
            return await transfer.receive_file(inc.dir, layer, name, offset, content)
        except transfer.NoSpace as exc:
            raise TargetError(str(exc), 507) from None
        except transfer.TransferError as exc:
            raise TargetError(str(exc), 409) from None

    def commit_layer(self, inc: Incoming, layer: str, manifest_json: str) -> None:
        _check(LAYER, layer, "layer")
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
        """Restore the chain ending at layer as the migration's container; confirm it runs."""
        _check(LAYER, layer, "layer")
        self._receiving(inc)
        if layer not in inc.layers:
            raise TargetError(f"layer {layer} was not received", 409)
        began = time.monotonic()
        try:
            pid = restore_container(inc.dir / layer, inc.container)
        except (criu.CriuError, chain_restore.LayerError, containers.ContainerError, OSError) as exc:
            raise TargetError(f"restore failed on this node: {exc}", 500) from None
        inc.pid, inc.starttime, inc.state = pid, procfs.read_stat(pid).starttime, "restored"
        self._save(inc)
        restored_at = time.monotonic()
        if not confirm_running(pid, inc.starttime):
            _kill_restored(inc)
            raise TargetError(f"the restored workload (pid {pid}) does not run", 500)
        if inc.container:
            containers.save(containers.Container(inc.container, pid, inc.starttime, inc.argv, "/dev/null"))
        return {"pid": pid, "restore_seconds": round(restored_at - began, 6),
                "confirm_seconds": round(time.monotonic() - restored_at, 6)}

    def commit(self, inc: Incoming) -> None:
        """The source has handed over: the workload is ours, its images are not needed."""
        if inc.state != "restored":
            raise TargetError(f"migration {inc.id} has nothing restored to commit", 409)
        inc.state = "committed"
        self.active.pop(inc.id, None)
        shutil.rmtree(inc.dir, ignore_errors=True)

    def abort(self, inc: Incoming, why: str) -> None:
        """Remove every trace: the restored workload (if any), the images, the record."""
        log.warning("migration %s from %s aborted: %s", inc.id, inc.source, why)
        if inc.state == "restored":
            _kill_restored(inc)
        self.active.pop(inc.id, None)
        shutil.rmtree(inc.dir, ignore_errors=True)

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for inc in list(self.active.values()):
            if now - inc.last_seen > LEASE:
                self.abort(inc, f"no word from {inc.source} for {LEASE:.0f} s")

    def status(self, inc: Incoming) -> dict:
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


def _kill_restored(inc: Incoming) -> None:
    if inc.container:  # everything in its cgroups, recorded or not
        containers.stop(inc.container)
    elif procfs.alive(inc.pid, inc.starttime):
        os.kill(inc.pid, signal.SIGKILL)


def restore_container(layer: Path, name: str) -> int:
    """criu restore of the chain, the restored tree in container name's cgroups (a fresh set,
    not the one it was dumped from), detached; returns its pid as this node sees it."""
    paths = containers.make_cgroups(name) if name else {}
    with tempfile.TemporaryDirectory(prefix="memsnap-restore-") as work:
        newest = chain_restore.verify(layer)[0].dir
        pidfile = Path(work) / "pid"
        criu.restore(newest, pidfile, Path(work),
                     preexec_fn=containers.join_cgroups_fn(paths) if paths else None)
        return int(pidfile.read_text())


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
