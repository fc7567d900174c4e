"""Where the cluster keeps its files, its addresses, and the record of what it started.

Host side: ``/run/memsnap/cluster/state.json`` (what runs: host processes by pid + start time,
and the nodes), ``/var/lib/memsnap/cluster/`` (tokens, keys, kubeconfigs, etcd data, logs).
Both go with ``down``. Addresses stay inside 198.18.0.0/15 like the nodes': the API server
listens on the nodes' bridge, pods of node-N get 198.19.N.0/24, services 198.18.128.0/17.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memsnap import procfs
from memsnap.nodes import net
from memsnap.nodes import runtime as nodes_runtime

STATE_DIR = Path("/run/memsnap/cluster")
DATA_DIR = Path("/var/lib/memsnap/cluster")
STATE_FILE = STATE_DIR / "state.json"
LOG_DIR = DATA_DIR / "logs"
ADMIN_KUBECONFIG = DATA_DIR / "admin.kubeconfig"

API_ADDRESS = net.BRIDGE_ADDRESS  # the host's address on memsnap0: every node reaches it
API_PORT = 6443
ETCD_CLIENT = "127.0.0.1:23790"  # only the API server (on the host) talks to etcd
ETCD_PEER = "127.0.0.1:23800"
SERVICE_RANGE = "198.18.128.0/17"
MAX_NODES = 200  # one /24 of 198.19.0.0/16 per node
NODE_LOG_DIR = "/var/log/memsnap-cluster"  # inside a node; on the host under its overlay upper dir


def pod_subnet(index: int) -> str:
    if not 1 <= index <= MAX_NODES:
        raise ValueError(f"node index {index} outside 1..{MAX_NODES}")
    return f"198.19.{index}.0/24"


def node_log(node: str, component: str) -> Path:
    """Host path of a node component's log (the node writes it into its overlay's upper dir)."""
    return nodes_runtime.DATA_DIR / node / "upper" / NODE_LOG_DIR.lstrip("/") / f"{component}.log"


@dataclass(frozen=True)
class Process:
    """A host process the cluster started (control plane)."""

    name: str
    pid: int
    starttime: int
    log: str

    @property
    def running(self) -> bool:
        return procfs.alive(self.pid, self.starttime)


@dataclass
class State:
    nodes: list[str] = field(default_factory=list)
    processes: dict[str, Process] = field(default_factory=dict)
    bare: bool = True
    started: float = field(default_factory=time.time)


def load() -> State | None:
    try:
        raw = json.loads(STATE_FILE.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    procs = {k: Process(**v) for k, v in raw.get("processes", {}).items()}
    return State(nodes=raw.get("nodes", []), processes=procs, bare=raw.get("bare", True),
                 started=raw.get("started", 0.0))


def save(state: State) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, STATE_FILE)


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
    """Start a host daemon in its own session, output to LOG_DIR/NAME.log."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=env)
    return Process(name, proc.pid, procfs.read_stat(proc.pid).starttime, str(log))


def stop(proc: Process, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after timeout; only if it still is the process we started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not proc.running:
            break
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while proc.running and time.monotonic() < deadline:
            _reap(proc.pid)
            time.sleep(0.05)
    _reap(proc.pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our child when `up` itself tears down after a failure
    except ChildProcessError:
        pass


def log_tail(path: str | Path, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:])
