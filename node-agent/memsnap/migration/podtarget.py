"""The target half of a pod migration, inside the target agent's Incoming: the agent does not
restore; it marks each container's received images ready and memsnap-runc, run by containerd's
shim when kubelet creates the target pod's container, restores them and writes its outcome
beside them (node-agent/memsnap/runtime/memsnap-runc).

    incoming/<id>/<container>/              runc's checkpoint images (+ memsnap-layer.json)
    incoming/<id>/<container>/.lazy         written here: this agent serves the pre-copied pages
                                            (criu lazy-pages, its socket in that directory): the
                                            wrapper restores with --lazy-pages, that directory its
                                            work path
    incoming/<id>/<container>/.ready        written here: the wrapper may restore
    incoming/<id>/<container>/.result.json  written by the wrapper: {"ok", "pid", "restore_ms"} or
                                            {"ok": false, "error"} (runc's and CRIU's last words)
"""
from __future__ import annotations

import json
import os
import re
import signal

from .. import procfs

CONTAINER = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a pod spec's container name
READY, RESULT, LAZY = ".ready", ".result.json", ".lazy"


def layer_ok(containers: list[str], layer: str) -> bool:
    """A pod migration's layers are named after its containers (pre-copy layers: NAME.lN)."""
    name, _, rest = layer.partition(".")
    return name in containers and (not rest or re.fullmatch(r"l[0-9]{1,4}", rest) is not None)


def mark_ready(inc, layer: str) -> None:
    _mark(inc.dir / layer / READY)


def mark_lazy(inc, layer: str) -> None:
    _mark(inc.dir / layer / LAZY)


def _mark(path) -> None:
    path.write_text("")
    os.chmod(path, 0o600)


def poll(inc) -> None:
    """restoring -> restored once every container was restored and runs; -> failed at the first
    container whose restore failed (the message says which and why)."""
    if inc.state != "restoring":
        return
    results = {}
    for name in inc.containers:
        try:
            results[name] = json.loads((inc.dir / name / RESULT).read_text())
        except (OSError, ValueError):
            continue  # not yet (the file appears whole: the wrapper renames it into place)
    inc.results = results
    for name, r in results.items():
        if not r.get("ok"):
            inc.state = "failed"
            inc.message = f"restoring container {name} failed on this node: {r.get('error', '').strip()}"
            return
    if len(results) < len(inc.containers):
        return
    pids = {}
    for name, r in results.items():
        pid = int(r.get("pid") or 0)
        if not _runs(pid):
            inc.state, inc.message = "failed", f"the restored container {name} (pid {pid}) does not run"
            return
        pids[name] = [pid, procfs.read_stat(pid).starttime]
    inc.pids, inc.state = pids, "restored"


def _runs(pid: int) -> bool:
    from .target import confirm_running  # one definition of "runs"
    try:
        return pid > 0 and confirm_running(pid, procfs.read_stat(pid).starttime, settle=0.0)
    except (OSError, ValueError):
        return False


def kill_restored(inc) -> None:
    """The restored containers' processes, before a commit: killed (kubelet then sees them exit;
    the caller deletes the target pod)."""
    for pid, starttime in (inc.pids or {}).values():
        if procfs.alive(pid, starttime):
            os.kill(pid, signal.SIGKILL)
    for name, r in (inc.results or {}).items():
        pid = int(r.get("pid") or 0)
        if r.get("ok") and pid and name not in (inc.pids or {}) and procfs.alive(pid):
            os.kill(pid, signal.SIGKILL)
