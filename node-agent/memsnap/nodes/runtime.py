"""Local nodes: start, stop, list, and run commands in them.

A node is a long-lived init (PID 1 of its own PID namespace, see boot.py) with its own mount,
UTS, IPC, network and cgroup namespaces, a root that is overlayfs over the cached image (upper
dir under /var/lib/memsnap/nodes/NAME, mounted only inside the node), a cgroup ``memsnap/NAME``,
and eth0 on the host bridge. Host-side state: /run/memsnap/nodes/NAME/node.json.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

from memsnap import cgroupfs
from memsnap.nodes import cgroups, image, net
from memsnap.nodes.image import Log

STATE_DIR = Path("/run/memsnap/nodes")
DATA_DIR = Path("/var/lib/memsnap/nodes")
LOCK_FILE = Path("/run/memsnap/nodes.lock")
NODE_AGENT_DIR = Path(__file__).resolve().parents[2]  # the checkout's node-agent/
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class NodeError(Exception):
    """A node operation failed."""


class BadNodeRequest(NodeError, ValueError):
    """The request itself is wrong (a bad argument, an unknown or stopped node)."""


class NodeNotRunning(BadNodeRequest):
    """The named node does not exist or is not running."""


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    pid: int  # host PID of the node's init
    starttime: int  # of that PID, to tell it from a recycled one
    address: str
    image: str  # digest of the image its root was made from
    checkout: str = ""  # the node-agent/ directory bind-mounted at image.CHECKOUT_MOUNT

    @property
    def running(self) -> bool:
        return _starttime(self.pid) == self.starttime


def node_name(index: int) -> str:
    return f"node-{index}"


def _starttime(pid: int) -> int | None:
    """Start time of a live (non-zombie) process, None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in "ZX" else int(fields[19])


# ---- state -------------------------------------------------------------------------------

def _state_file(name: str) -> Path:
    return STATE_DIR / name / "node.json"


def _load(name: str) -> Node | None:
    try:
        raw = json.loads(_state_file(name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    known = {f.name for f in fields(Node)}
    try:  # tolerate fields written by a newer or older memsnap
        return Node(**{k: v for k, v in raw.items() if k in known})
    except TypeError:
        return None


def _known_names() -> list[str]:
    if not STATE_DIR.is_dir():
        return []
    names = [p.name for p in STATE_DIR.iterdir() if p.is_dir()]
    return sorted(names, key=lambda n: (len(n), n))


@contextmanager
def _locked() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ---- queries -----------------------------------------------------------------------------

def list_nodes() -> list[Node]:
    """Every node with state on this machine, running or not (check ``.running``)."""
    return [n for n in map(_load, _known_names()) if n is not None]


def get(name: str) -> Node:
    """The running node called name, or NodeNotRunning."""
    node = _load(name)
    if node is None:
        known = ", ".join(n.name for n in list_nodes() if n.running) or "none"
        raise NodeNotRunning(f"unknown node {name!r} (running: {known}; start them with `memsnap nodes up`)")
    if not node.running:
        raise NodeNotRunning(f"node {name!r} is not running (init {node.pid} is gone); run `memsnap nodes up`")
    return node


# ---- up / down ---------------------------------------------------------------------------

def up(count: int = 2, log: Log | None = None) -> list[Node]:
    """Make node-1..node-<count> run (building the image first if needed). Idempotent."""
    if not 1 <= count <= net.MAX_NODES:
        raise BadNodeRequest(f"--count must be between 1 and {net.MAX_NODES}, got {count}")
    _require_root()
    with _locked():
        img = image.ensure(log)
        nodes = [n for n in list_nodes() if n.running]
        image.prune({img.digest} | {n.image for n in nodes})
        net.ensure_bridge()
        started = []
        for index in range(1, count + 1):
            name = node_name(index)
            current = _load(name)
            if current is not None and current.running:
                _warn_if_outdated(current, img, log)
                continue
            _teardown(name)  # whatever a dead node left behind
            started.append(_start(name, index, img))
        running = [n for n in list_nodes() if n.running]
        _write_hosts(running)
        _start_agents(started)
        return running


def down(names: Sequence[str] | None = None) -> list[str]:
    """Stop the given nodes (default: all) and remove all they left; returns the names stopped."""
    _require_root()
    with _locked():
        known = _known_names()
        targets = list(names) if names else known
        for name in targets:
            if name not in known:
                raise NodeNotRunning(f"unknown node {name!r} (known: {', '.join(known) or 'none'})")
        for name in targets:
            _teardown(name)
        if not _known_names():
            net.remove_bridge()
            for d in (STATE_DIR, DATA_DIR):
                _rmdir_quiet(d)
        return targets


def _warn_if_outdated(node: Node, img: image.Image, log: Log | None) -> None:
    """A running node is left alone, even if it was started from another image or checkout."""
    stale = []
    if node.image != img.digest:
        stale.append(f"image {node.image} (current: {img.digest})")
    if node.checkout and node.checkout != str(NODE_AGENT_DIR):
        stale.append(f"checkout {node.checkout}")
    if stale:
        (log or image.stderr_log)(f"memsnap: {node.name} keeps running with {' and '.join(stale)}; "
                               f"`memsnap nodes down` then `up` to renew it")


def _require_root() -> None:
    if os.geteuid() != 0:
        raise NodeError("local nodes need root (namespaces, mounts, cgroups, veths)")


def _start(name: str, index: int, img: image.Image) -> Node:
    state, data = STATE_DIR / name, DATA_DIR / name
    for d in (state / "root", data / "upper", data / "work"):
        d.mkdir(parents=True, exist_ok=True)
    cgroups.create(name)
    cfg = {
        "cgroups": sorted(cgroups.hierarchies()),
        "name": name,
        "merged": str(state / "root"),
        "lower": str(img.root),
        "upper": str(data / "upper"),
        "work": str(data / "work"),
        "checkout": str(NODE_AGENT_DIR),
        "checkout_mount": image.CHECKOUT_MOUNT,
    }
    env = dict(os.environ, PYTHONPATH=str(NODE_AGENT_DIR))
    proc = subprocess.run([sys.executable, "-m", "memsnap.nodes.boot", json.dumps(cfg)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        _teardown(name)
        raise NodeError(f"could not start {name}: {proc.stderr.strip()}")
    pid = int(proc.stdout.strip())
    node = Node(name, index, pid, _starttime(pid) or 0, net.node_address(index), img.digest, str(NODE_AGENT_DIR))
    # Record before wiring the network, so a failure below still leaves something `down` removes.
    _state_file(name).write_text(json.dumps(asdict(node)) + "\n")
    try:
        net.attach(name, index, pid)
    except Exception:
        _teardown(name)
        raise
    return node


def _start_agents(started: list[Node]) -> None:
    """`memsnap agent` in each new node (agents.py); a node whose agent fails is not left up."""
    from memsnap.nodes import agents  # it calls back into this module
    try:
        agents.start(started)
    except BaseException:
        for node in started:
            _teardown(node.name)
        raise


def _teardown(name: str) -> None:
    """Kill everything of the node and remove its cgroups, veth and directories. Idempotent."""
    node = _load(name)
    if node is not None and node.running:
        os.kill(node.pid, signal.SIGKILL)  # the kernel then kills the whole PID namespace
    cgroups.kill_all(name)
    if node is not None:
        _wait_gone(node)
    net.detach(name)
    cgroups.remove(name)
    shutil.rmtree(STATE_DIR / name, ignore_errors=True)
    shutil.rmtree(DATA_DIR / name, ignore_errors=True)


def _wait_gone(node: Node, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while node.running:
        if time.monotonic() > deadline:
            raise NodeError(f"init {node.pid} of {node.name} survived SIGKILL")
        time.sleep(0.02)


def _rmdir_quiet(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def _write_hosts(nodes: list[Node]) -> None:
    """Let nodes find each other by name (node-1, ...) as well as by address."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{net.BRIDGE_ADDRESS}\thost"]
    lines += [f"{n.address}\t{n.name}" for n in nodes]
    text = "\n".join(lines) + "\n"
    for n in nodes:
        run(n.name, ["sh", "-c", "cat > /etc/hosts"], input=text, text=True, check=True,
            stdout=subprocess.DEVNULL)


# ---- running things in a node ------------------------------------------------------------

def command(name: str, argv: Sequence[str]) -> list[str]:
    """The host argv that runs argv inside the node: nsenter into all of init's namespaces.

    Use with node_env() and preexec_fn=join_cgroup_fn(name) (what run()/popen() do).
    """
    if not argv:
        raise BadNodeRequest("no command given")
    node = get(name)
    return ["nsenter", f"--target={node.pid}", "--mount", "--uts", "--ipc", "--net", "--pid",
            "--cgroup", "--root", "--wd", "--", *argv]


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment for node processes (nothing of the host's venv or PATH leaks in)."""
    env = {"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    env.update(extra or {})
    return env


def join_cgroup_fn(name: str):
    """A preexec_fn putting the child into the node's cgroups."""
    return cgroupfs.join_fn(cgroups.paths(name).values())


def popen(name: str, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start argv in the node (its namespaces, root and cgroup), like subprocess.Popen.

    The child gets no fd above 2 (close_fds); give it stdio from inside the node (or DEVNULL)
    if CRIU is to dump it later.
    """
    return subprocess.Popen(command(name, argv), env=node_env(env), preexec_fn=join_cgroup_fn(name),
                            close_fds=True, **kwargs)


def run(name: str, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run argv in the node to completion, like subprocess.run (kwargs: input, capture_output, check, ...)."""
    return subprocess.run(command(name, argv), env=node_env(env), preexec_fn=join_cgroup_fn(name),
                          close_fds=True, **kwargs)


def copy_in(src: str | os.PathLike, name: str, dst: str) -> str:
    """Copy a host file or directory into the node (like cp -r); returns the path written in the node.

    The copy is written by processes inside the node, so the node's own symlinks resolve in the
    node's root, never the host's.
    """
    src_path = Path(src)
    if not src_path.exists():
        raise BadNodeRequest(f"no such file or directory: {src}")
    if not dst.startswith("/"):
        raise BadNodeRequest(f"destination must be an absolute path in the node, got {dst!r}")
    get(name)
    if dst.endswith("/") or run(name, ["test", "-d", dst]).returncode == 0:
        dst = dst.rstrip("/") + "/" + src_path.name
    if src_path.is_dir():
        _copy_dir(src_path, name, dst)
    else:
        with open(src_path, "rb") as f:
            mode = f"{src_path.stat().st_mode & 0o7777:o}"
            script = 'cat > "$1" && chmod "$2" "$1"'
            proc = run(name, ["sh", "-c", script, "sh", dst, mode], stdin=f, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise NodeError(f"copy to {name}:{dst} failed: {proc.stderr.strip()}")
    return dst


def _copy_dir(src: Path, name: str, dst: str) -> None:
    pack = subprocess.Popen(["tar", "-C", str(src), "-cf", "-", "."], stdout=subprocess.PIPE)
    unpack = run(name, ["sh", "-c", 'mkdir -p "$1" && tar -C "$1" -xf -', "sh", dst],
                 stdin=pack.stdout, stderr=subprocess.PIPE, text=True)
    pack.stdout.close()
    if pack.wait() != 0 or unpack.returncode != 0:
        raise NodeError(f"copy to {name}:{dst} failed: {unpack.stderr.strip()}")
