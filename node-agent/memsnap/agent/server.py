"""The agent's HTTP side (aiohttp) and its periodic loop.

/metrics, /healthz and /readyz are open; the /api/v1 reads want a client certificate or the
bearer token, calls that move memory want mutual TLS (auth.py says who may call what; more
routes: ``add_routes(app, [web.post(...)], kind=MEMORY)``). With TLS the open routes are also
served plain on a second port (serve_open_routes). Every tracking call runs in one dedicated
worker thread, so rounds never overlap and the event loop always answers (health probes stay fast).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from .auth import MEMORY, OPEN, READ, Policy, add_routes, setup
from ..migration import api as migration_api
from ..podcheckpoint import api as checkpoint_api
from .config import Config
from .metrics import make_registry
from .pods import PodDirectory
from .tracker_pool import ProcessView, Snapshot, TrackerPool

log = logging.getLogger(__name__)

POOL = web.AppKey("pool", TrackerPool)
CFG = web.AppKey("cfg", Config)


@dataclass
class AgentState:
    directory: PodDirectory
    worker: concurrent.futures.ThreadPoolExecutor  # one thread: every tracking call, in order
    last_cycle: float = 0.0  # monotonic time of the last completed cycle, 0 before the first
    error: str = ""  # why the last cycle failed, "" when it did not


STATE = web.AppKey("state", AgentState)
REGISTRY = web.AppKey("registry", object)


__all__ = ["MEMORY", "OPEN", "READ", "add_routes", "make_app", "serve_open_routes"]


def make_app(cfg: Config) -> web.Application:
    app = web.Application()
    setup(app, Policy(token=cfg.token, tls=cfg.tls is not None))
    directory = PodDirectory(cfg.kubeconfig, cfg.node_name)
    pool = TrackerPool(cfg, directory)
    if cfg.selection.needs_metadata and not directory.available:
        log.warning("namespace, selector and annotation filters need the Kubernetes API: "
                    "no pod will be tracked (reason no-metadata)")
    app[CFG], app[POOL] = cfg, pool
    app[STATE] = AgentState(directory, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memsnap-track"))
    app[REGISTRY] = make_registry(lambda: pool.snapshot, cfg, __version__)
    add_routes(app, _open_routes(), kind=OPEN)
    add_routes(app, [web.get("/api/v1/pods", api_pods),
                     web.get("/api/v1/pods/{uid}", api_pod),
                     web.get("/api/v1/pods/{namespace}/{name}", api_pod),
                     web.get("/api/v1/status", api_status)], kind=READ)
    if cfg.tls is not None:  # moving memory needs mutual TLS: no migrations without it
        worker = app[STATE].worker  # the pool's own thread: lending never overlaps a cycle
        lend = lambda pids, lend: asyncio.get_running_loop().run_in_executor(  # noqa: E731
            worker, pool.lend if lend else pool.give_back, pids)
        migration_api.setup(app, cfg.tls, lend)
        checkpoint_api.setup(app, cfg.tls, lend)
    app.cleanup_ctx.append(_background)
    return app


def serve_open_routes(app: web.Application, sock: socket.socket) -> None:
    """Serve only the open routes, plain HTTP, on sock while app runs (Prometheus, probes)."""
    async def plain_site(app: web.Application):
        plain = web.Application()
        for key in (CFG, STATE, REGISTRY):
            plain[key] = app[key]
        plain.router.add_routes(_open_routes())
        runner = web.AppRunner(plain, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        yield
        await runner.cleanup()
    app.cleanup_ctx.append(plain_site)


def _open_routes() -> list[web.RouteDef]:
    return [web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)]


# Background: a cycle every interval; on shutdown, stop every session


async def _background(app: web.Application):
    state, pool = app[STATE], app[POOL]
    worker = state.worker
    loop = asyncio.get_running_loop()
    if state.directory.available:  # names before the first cycle, so selection can apply
        await asyncio.to_thread(state.directory.refresh)
    task = asyncio.create_task(_cycles(app))
    stop_watch = threading.Event()
    if state.directory.available:  # a daemon thread: a watch blocked on the network must not hold up shutdown
        threading.Thread(target=state.directory.watch, args=(stop_watch,), name="memsnap-pod-watch",
                         daemon=True).start()
    yield
    stop_watch.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # The worker may be mid-round: stop_all queues behind it, so targets end clean.
    await loop.run_in_executor(worker, pool.stop_all)
    worker.shutdown(wait=True)
    log.info("stopped: every target left clean")


async def _cycles(app: web.Application) -> None:
    state, pool, cfg = app[STATE], app[POOL], app[CFG]
    loop = asyncio.get_running_loop()
    next_due = time.monotonic()
    while True:
        try:
            snap: Snapshot = await asyncio.shield(loop.run_in_executor(state.worker, pool.cycle))
            state.last_cycle, state.error = time.monotonic(), ""
            log.debug("cycle", extra={"seconds": round(snap.cycle_seconds, 4), "containers": len(snap.containers)})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in one cycle must not end the agent: say so, try again
            state.error = f"{type(exc).__name__}: {exc}"
            log.exception("cycle failed")
        next_due += cfg.interval
        now = time.monotonic()
        if next_due < now:  # overran: skip the missed slots instead of bunching cycles
            next_due = now + cfg.interval
        await asyncio.sleep(next_due - now)


# Open endpoints


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Alive: the cycle loop has run within three intervals (a wedged worker fails this)."""
    state, cfg = request.app[STATE], request.app[CFG]
    age = time.monotonic() - state.last_cycle if state.last_cycle else 0.0
    if age > 3 * cfg.interval + 30:
        return web.json_response({"ok": False, "reason": f"no cycle for {age:.0f}s"}, status=503)
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    """Ready: a cycle completed, so /metrics and the API hold real numbers."""
    state = request.app[STATE]
    if not state.last_cycle:
        return web.json_response({"ready": False, "reason": "first cycle not done"}, status=503)
    if state.error:
        return web.json_response({"ready": False, "reason": state.error}, status=503)
    return web.json_response({"ready": True})


# The JSON API (READ routes)


def pods_json(snap: Snapshot) -> list[dict]:
    pods: dict[str, dict] = {}
    for c in snap.containers:
        pod = pods.setdefault(c.pod_uid, {"uid": c.pod_uid, "namespace": c.namespace, "name": c.pod,
                                          "dirty_bytes_per_second": 0.0, "tracked_bytes": 0,
                                          "containers": []})
        pod["dirty_bytes_per_second"] += c.dirty_bytes_per_second
        pod["tracked_bytes"] += c.tracked_bytes
        pod["containers"].append({
            "name": c.container, "id": c.container_id,
            "dirty_bytes_per_second": c.dirty_bytes_per_second, "dirty_pages_total": c.dirty_pages_total,
            "tracked_bytes": c.tracked_bytes, "writable_working_set_bytes": c.working_set_bytes,
            "vma_events": c.vma_events,
            "processes": [_process_json(p) for p in c.processes]})
    return list(pods.values())


def _process_json(p: ProcessView) -> dict:
    """A tracked process has no skipped/detail keys; a skipped one no measurements."""
    if p.skipped:
        return {"pid": p.pid, "comm": p.comm, "skipped": p.skipped, "detail": p.detail}
    return {k: v for k, v in asdict(p).items() if k not in ("skipped", "detail")}


async def api_pods(request: web.Request) -> web.Response:
    snap = request.app[POOL].snapshot
    return web.json_response({"time": snap.time, "node": request.app[CFG].node_name, "pods": pods_json(snap)})


async def api_pod(request: web.Request) -> web.Response:
    """One pod, by UID or by namespace/name."""
    m = request.match_info
    wanted = m["uid"] if "uid" in m else f"{m['namespace']}/{m['name']}"
    for pod in pods_json(request.app[POOL].snapshot):
        if wanted in (pod["uid"], f"{pod['namespace']}/{pod['name']}"):
            return web.json_response(pod)
    return web.json_response({"error": f"no pod {wanted} on this node"}, status=404)


async def api_status(request: web.Request) -> web.Response:
    snap, cfg = request.app[POOL].snapshot, request.app[CFG]
    return web.json_response({
        "node": cfg.node_name, "version": __version__, "cycles": snap.cycles,
        "cycle_seconds": snap.cycle_seconds, "interval_seconds": cfg.interval,
        "backends": snap.backends, "tracked_bytes": snap.tracked_bytes,
        "max_tracked_bytes": cfg.max_tracked_bytes, "cpu_seconds": snap.cpu_seconds,
        "cpu_limit_cores": cfg.cpu_limit, "skipped": snap.skipped, "errors": snap.errors,
        "kube_api": snap.kube_api, "last_error": request.app[STATE].error})
