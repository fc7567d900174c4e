"""Containers on a node, as a container runtime makes them: what `memsnap nodes run` starts and
what a migration restores.

A container is a process that is the init of its own PID namespace and the leader of its own
session (so CRIU dumps it with its namespace and a restore never collides with the node's
pids), sitting in a cgroup of its own, ``containers/<name>`` in every hierarchy the node has,
with stdio on /dev/null or a log file and no inherited fd. Its record is
``/run/memsnap/containers/<name>.json`` on the node. This module runs inside the node.
"""
from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

from . import cgroupfs, procfs

STATE_DIR = Path("/run/memsnap/containers")
LOG_DIR = Path("/var/log/memsnap/containers")
CGROUP_PARENT = "containers"
NAME = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$")


class ContainerError(Exception):
    """A container could not be started, found or restored; the message says why."""


@dataclass(frozen=True)
class Container:
    name: str
    pid: int  # as the node sees it
    starttime: int
    argv: list[str]
    log: str  # where stdout and stderr go ("/dev/null" when nowhere)

    @property
    def running(self) -> bool:
        return procfs.alive(self.pid, self.starttime)


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ContainerError(f"bad container name {name!r}: lowercase letters, digits, '.', '_', '-', "
                             "at most 63, starting and ending with a letter or digit")
    return name


# ---- cgroups -----------------------------------------------------------------------------

def cgroup_paths(name: str) -> dict[str, Path]:
    """The container's cgroup in every hierarchy mounted on this node."""
    return {kind: mount / CGROUP_PARENT / name for kind, mount in cgroupfs.hierarchies().items()}


def make_cgroups(name: str) -> dict[str, Path]:
    paths = cgroup_paths(name)
    for kind, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        if kind == "cpuset":  # a v1 cpuset admits no task until it has cpus and mems
            for f in ("cpuset.cpus", "cpuset.mems"):
                (path / f).write_text((path.parent.parent / f).read_text())
    return paths


def join_cgroups_fn(paths: dict[str, Path]):
    """A preexec_fn putting the caller into paths."""
    return cgroupfs.join_fn(paths.values())


def remove_cgroups(name: str) -> None:
    """Remove the container's cgroups (and any left below them, e.g. a freezer's), deepest first."""
    for path in cgroup_paths(name).values():
        for cg in cgroupfs.subtree(path):
            cgroupfs.rmdir(cg)


def container_of(pid: int) -> str | None:
    """The name of the container pid sits in (by its cgroup), None when it is in none."""
    for path in cgroupfs.membership(pid).values():
        parts = path.strip("/").split("/")
        if len(parts) >= 2 and parts[0] == CGROUP_PARENT:
            return parts[1]
    return None


# ---- records -----------------------------------------------------------------------------

def _record(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def save(c: Container) -> None:
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = _record(c.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(c)) + "\n")
    os.replace(tmp, _record(c.name))


def load(name: str) -> Container | None:
    try:
        return Container(**json.loads(_record(name).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def list_all() -> list[Container]:
    if not STATE_DIR.is_dir():
        return []
    found = (load(p.stem) for p in sorted(STATE_DIR.glob("*.json")))
    return [c for c in found if c is not None]


def forget(name: str) -> None:
    _record(name).unlink(missing_ok=True)


# ---- start / stop ------------------------------------------------------------------------

def start(name: str, argv: list[str], log: str | None = None) -> Container:
    """Start argv as a new container; returns once it runs (its exec succeeded)."""
    check_name(name)
    if not argv:
        raise ContainerError("no command given")
    old = load(name)
    if old is not None and old.running:
        raise ContainerError(f"container {name!r} already runs (pid {old.pid})")
    log_path = _log_path(name, log)
    paths = make_cgroups(name)
    pid = _spawn(argv, log_path, join_cgroups_fn(paths))
    c = Container(name, pid, procfs.read_stat(pid).starttime, list(argv), log_path)
    save(c)
    return c


def _log_path(name: str, log: str | None) -> str:
    if log is None:
        return "/dev/null"
    path = Path(log) if log else LOG_DIR / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def _spawn(argv: list[str], log: str, join_cgroups) -> int:
    """fork; the child joins the cgroups and a new PID namespace and forks the container's
    init, which makes its own session, takes its stdio and execs argv. Returns init's pid."""
    rfd, wfd = os.pipe()  # init's pid (from the middle child), then exec errors (from init)
    middle = os.fork()
    if middle == 0:
        _middle(argv, log, join_cgroups, rfd, wfd)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read().decode(errors="replace")
    os.waitpid(middle, 0)
    head, _, error = data.partition("\n")
    if not head.isdigit():
        raise ContainerError(f"could not start {argv[0]}: {head or 'no pid'}")
    if error:
        raise ContainerError(f"could not start {argv[0]}: {error}")
    return int(head)


def _middle(argv, log, join_cgroups, rfd, wfd) -> None:
    try:
        os.close(rfd)
        join_cgroups()
        os.unshare(os.CLONE_NEWPID)
        init = os.fork()
        if init == 0:
            _init(argv, log, wfd)
        os.write(wfd, f"{init}\n".encode())
        os._exit(0)  # init is reparented to the node's reaper
    except BaseException as exc:  # noqa: BLE001 - anything goes back to the parent
        os.write(wfd, f"{type(exc).__name__}: {exc}".encode())
        os._exit(1)


def _init(argv, log, wfd) -> None:
    try:
        os.setsid()  # CRIU dumps a PID-namespace init only if its session leader is inside
        null = os.open("/dev/null", os.O_RDONLY)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.closerange(3, wfd)
        os.closerange(wfd + 1, os.sysconf("SC_OPEN_MAX"))
        os.set_inheritable(wfd, False)  # closes on exec: the parent reads EOF
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execvp(argv[0], argv)
    except BaseException as exc:  # noqa: BLE001
        os.write(wfd, f"\n{type(exc).__name__}: {exc}".encode())
    os._exit(127)


def stop(name: str, timeout: float = 5.0) -> bool:
    """Kill everything in the container's cgroups (recorded or not: a restore in progress has
    no record yet), remove its cgroups and record. Returns whether anything was running."""
    c = load(name)
    if c is not None and c.running and c.pid not in cgroupfs.tasks(cgroup_paths(name).values()):
        os.kill(c.pid, signal.SIGKILL)  # recorded but moved out of its cgroups
    try:
        found = cgroupfs.kill_tasks(cgroup_paths(name).values(), f"container {name!r}", timeout)
    except RuntimeError as exc:
        raise ContainerError(str(exc)) from None
    remove_cgroups(name)
    forget(name)
    return found or bool(c and c.running)
