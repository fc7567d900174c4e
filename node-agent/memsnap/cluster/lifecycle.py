"""`up`, `down`, `status` and `load` of the cluster: the control plane on the host, workers in local nodes.

``up`` is all-or-explain: when a component fails it stops and names the component and its log,
leaving everything in place to read; ``down`` (or the next ``up``) clears it. The cluster's nodes
are local nodes (memsnap.nodes): ``up`` restarts any that run already, so each worker starts clean.
"""
from __future__ import annotations

import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memsnap import nodes
from memsnap.filelock import locked
from memsnap.cluster import api, chart, controlplane, kubeconfig, state, worker
from memsnap.cluster import build as kbuild
from memsnap.nodes import net
from memsnap.nodes import runtime as nodes_runtime

Log = Callable[[str], None]
LOCK_FILE = Path("/run/memsnap/cluster.lock")
READY_TIMEOUT = 180.0


class ClusterError(RuntimeError):
    """The cluster could not be brought up, or an operation on it failed."""


class BadRequest(ClusterError, ValueError):
    """The request itself is wrong (bad count, no cluster, bad archive)."""


class AlreadyUp(ClusterError):
    """up on a cluster that runs and is healthy."""


@dataclass
class Status:
    up: bool
    components: dict[str, str] = field(default_factory=dict)  # control plane: "running" or why not
    nodes: dict[str, str] = field(default_factory=dict)  # node: "Ready" or why not
    kubeconfig: str = ""
    memsnap: str = ""  # what the chart installed: "agents Ready on 2 of 2 nodes ...", or "bare"

    @property
    def healthy(self) -> bool:
        return (self.up and all(v == "running" for v in self.components.values())
                and all(v == "Ready" for v in self.nodes.values()))


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError("the cluster needs root (local nodes, host processes, routes)")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- up ----------------------------------------------------------------------------------

def up(count: int = 2, bare: bool = False, log: Log | None = None, operator: bool = True,
       wait_operator: bool = True) -> Status:
    """Start a cluster of `count` workers with memsnap installed by its chart (bare: without);
    AlreadyUp if a healthy one runs (a broken one is cleared). operator, wait_operator: as for
    chart.install."""
    log = log or _stderr
    limit = min(state.MAX_NODES, net.MAX_NODES)
    if not 1 <= count <= limit:
        raise BadRequest(f"--nodes must be between 1 and {limit}, got {count}")
    _require_root()
    with locked(LOCK_FILE):
        _clear_previous(log)
        started = time.monotonic()
        st = _start(count, bare, log, lambda workers: chart.install(workers, log, operator, wait_operator))
        what = "" if bare else " and memsnap installed"
        log(f"memsnap: cluster up with {count} Ready nodes{what} in {time.monotonic() - started:.1f} s; "
            f"kubeconfig: {state.ADMIN_KUBECONFIG}")
        return _status(st)


def _clear_previous(log: Log) -> None:
    old = state.load()
    if old is None:
        shutil.rmtree(state.DATA_DIR, ignore_errors=True)
        return
    if _status(old).healthy:
        raise AlreadyUp(f"the cluster is already up with {len(old.nodes)} Ready nodes "
                        f"({', '.join(old.nodes)}); `memsnap cluster down` first to start another")
    log("memsnap: clearing the remains of a previous cluster")
    _teardown(old)


def _start(count: int, bare: bool, log: Log, install: Callable[[list[worker.Worker]], None]) -> state.State:
    b = kbuild.ensure(log)
    names = [nodes_runtime.node_name(i) for i in range(1, count + 1)]
    st = state.State(nodes=names, bare=bare)
    state.save(st)  # from here on, down finds whatever is started
    tokens = kubeconfig.make_credentials(names)
    workers = _start_nodes(names, log)  # first: the API server listens on their bridge
    log("memsnap: starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler")
    controlplane.start(b, st, tokens, record=lambda: state.save(st))
    kubeconfig.write(state.ADMIN_KUBECONFIG, kubeconfig.ADMIN[0], tokens[kubeconfig.ADMIN[0]])
    for w in workers:
        log(f"memsnap: starting containerd and kubelet on {w.name}")
        worker.setup(w, b, tokens[kubeconfig.kubelet_identity(w.name)[0]])
    worker.route(workers)
    _wait_ready(st)
    _wait_service_account()
    worker.route_kubernetes_service(workers, _kubernetes_service_ip())
    if not bare:
        install(workers)
    return st


def _start_nodes(names: list[str], log: Log) -> list[worker.Worker]:
    running = [n.name for n in nodes.list_nodes() if n.running and n.name in names]
    if running:
        log(f"memsnap: restarting {', '.join(running)} for the cluster (a worker starts clean)")
        nodes.down(running)
    nodes.up(count=len(names), log=log)
    return [worker.Worker(n.name, n.index, n.address) for n in (nodes.get(name) for name in names)]


def _wait_ready(st: state.State) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        current = _status(st)
        broken = {k: v for k, v in current.components.items() if v != "running"}
        if broken:
            raise ClusterError("; ".join(f"{k}: {v}" for k, v in broken.items()))
        waiting = {k: v for k, v in current.nodes.items() if v != "Ready"}
        if not waiting:
            return
        dead = {k: v for k, v in waiting.items() if "not running" in v}
        if dead or time.monotonic() > deadline:
            raise ClusterError("; ".join(f"{k}: {v}" for k, v in (dead or waiting).items()))
        time.sleep(0.5)


def _wait_service_account(timeout: float = 60.0) -> None:
    """Pods in `default` need its service account and token secret, which the controllers create."""
    deadline = time.monotonic() + timeout
    while True:
        sa = api.get("/api/v1/namespaces/default/serviceaccounts/default")
        if sa.get("secrets"):
            return
        if time.monotonic() > deadline:
            raise ClusterError("no token for the default service account after "
                               f"{timeout:.0f} s; log: {state.LOG_DIR / 'kube-controller-manager.log'}")
        time.sleep(0.5)


def _kubernetes_service_ip(timeout: float = 30.0) -> str:
    """The ClusterIP of the `kubernetes` Service (the API server makes it at start)."""
    deadline = time.monotonic() + timeout
    while True:
        ip = api.get("/api/v1/namespaces/default/services/kubernetes").get("spec", {}).get("clusterIP")
        if ip:
            return ip
        if time.monotonic() > deadline:
            raise ClusterError(f"no `kubernetes` Service after {timeout:.0f} s; "
                               f"log: {state.LOG_DIR / 'kube-apiserver.log'}")
        time.sleep(0.5)


# ---- install ------------------------------------------------------------------------------

def install(log: Log | None = None, operator: bool = True, wait_operator: bool = True) -> None:
    """Install or upgrade memsnap in the running cluster from the checkout as it is now (the
    image rebuilt if the code changed, the release upgraded, pods rolled)."""
    _require_root()
    with locked(LOCK_FILE):
        st = state.load()
        if st is None or not _status(st).healthy:
            raise BadRequest("no healthy cluster is up (run `memsnap cluster up`; `status` says what is wrong)")
        workers = [worker.Worker(n.name, n.index, n.address) for n in (nodes.get(name) for name in st.nodes)]
        chart.install(workers, log or _stderr, operator, wait_operator)
        st.bare = False
        state.save(st)


# ---- down --------------------------------------------------------------------------------

def down() -> bool:
    """Stop everything the cluster started and remove what it left; False if there was nothing."""
    _require_root()
    with locked(LOCK_FILE):
        st = state.load()
        if st is None:
            found = state.DATA_DIR.exists()
            shutil.rmtree(state.DATA_DIR, ignore_errors=True)
            return found
        _teardown(st)
        return True


def _teardown(st: state.State) -> None:
    controlplane.stop(st)
    known = {n.name for n in nodes.list_nodes()}
    cluster_nodes = [n for n in st.nodes if n in known]
    if cluster_nodes:
        nodes.down(cluster_nodes)
    worker.unroute([int(n.rsplit("-", 1)[1]) for n in st.nodes])
    shutil.rmtree(state.DATA_DIR, ignore_errors=True)
    shutil.rmtree(state.STATE_DIR, ignore_errors=True)


# ---- status ------------------------------------------------------------------------------

def status() -> Status:
    st = state.load()
    return Status(up=False) if st is None else _status(st)


def _status(st: state.State) -> Status:
    components = controlplane.health(st)
    try:
        conditions = api.node_conditions() if components["kube-apiserver"] == "running" else None
    except api.ApiError as exc:
        components["kube-apiserver"] = str(exc)
        conditions = None
    return Status(up=True, components=components, nodes={n: _node_status(n, conditions) for n in st.nodes},
                  kubeconfig=str(state.ADMIN_KUBECONFIG),
                  memsnap="bare (no chart)" if st.bare else chart.describe(len(st.nodes)) if conditions else "")


def _node_status(name: str, conditions: dict[str, dict] | None) -> str:
    """"Ready", or what is wrong with the node, naming the log to read."""
    try:
        nodes.get(name)
    except nodes.NodeNotRunning:
        return "node not running (its init is gone); `memsnap cluster down` then `up`"
    running = worker.daemons(name)
    why = [f"{c} not running, log: {state.node_log(name, c)}" for c in ("containerd", "kubelet") if c not in running]
    ready = (conditions or {}).get(name)
    if conditions is None:
        why.append("API server unavailable")
    elif ready is None:
        why.append("not registered with the API server yet")
    elif ready.get("status") == "True" and not why:
        return "Ready"
    else:
        why = ["Ready" if ready.get("status") == "True" else "NotReady", *why,
               f"API: Ready={ready.get('status')} ({ready.get('reason', '')}: {ready.get('message', '')})"]
    if "kubelet" in running:  # running but not Ready: its log says why
        why.append(f"kubelet log: {state.node_log(name, 'kubelet')}")
    return "; ".join(why)


# ---- load --------------------------------------------------------------------------------

def load(archive: Path) -> dict[str, list[str]]:
    """Import an image archive into every node; returns node -> image names imported."""
    _check_archive(archive)
    _require_root()
    st = state.load()
    if st is None:
        raise BadRequest("no cluster is up (run `memsnap cluster up`)")
    return {name: worker.import_image(name, archive) for name in st.nodes}


def _check_archive(archive: Path) -> None:
    if not archive.is_file():
        raise BadRequest(f"no such image archive: {archive}")
    try:
        with tarfile.open(archive) as tar:
            names = {m.name.lstrip("./") for m in tar.getmembers()}
    except tarfile.TarError:
        raise BadRequest(f"{archive} is not a tar archive (want a docker-archive or an OCI layout)") from None
    if not names & {"manifest.json", "index.json"}:
        raise BadRequest(f"{archive} has neither manifest.json (docker-archive) nor index.json (OCI layout)")
