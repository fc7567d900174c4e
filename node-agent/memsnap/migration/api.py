"""The agent's migration endpoints. Every one of them moves, restores or deletes memory, so
every one needs mutual TLS: the peer's certificate names who calls.

Source side (called by `memsnap migrate` on this node, or the operator):
    POST   /api/v1/migrations                 {"pid", "to", policy...} -> NDJSON events, last "done" or "error"
    POST   /api/v1/migrations                 {"pod": {"namespace", "name", "uid"}, "id", "to", "targetPod",
                                              policy...} -> 202 {"id"}: a pod migration (podsource.py), in
                                              the background
    GET    /api/v1/migrations/{id}            a pod migration's status (phase, progress, message)
    POST   /api/v1/migrations/{id}/complete   the source pod was deleted: end its frozen copy
    DELETE /api/v1/migrations/{id}            roll back unless handed over; idempotent
Target side (called by the source node's agent; only that node may drive its migration):
    POST   /api/v1/incoming/{id}              {"container", "argv", "memory_bytes"} or {"pod", "containers"}
    GET    /api/v1/incoming/{id}              state
    DELETE /api/v1/incoming/{id}              abort: no restored process, no images left
    GET    /api/v1/incoming/{id}/layers/{layer}/files/{name}         {"size": bytes held}
    PUT    /api/v1/incoming/{id}/layers/{layer}/files/{name}?offset=N  streamed body
    POST   /api/v1/incoming/{id}/layers/{layer}/commit               the layer's manifest
    POST   /api/v1/incoming/{id}/restore      {"layer"} -> {"pid", "restore_seconds"}; a pod migration's
                                              container: marked ready for memsnap-runc -> {"state"}, and
                                              GET .../{id} says restoring, restored or failed
    POST   /api/v1/incoming/{id}/commit       the source has handed over; answers within 5 s:
                                              {"state": "filling", progress} (ask again) or
                                              {"state": "committed", "fill_seconds"}
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid

import aiohttp
from aiohttp import web

from .. import pki, procfs
from ..agent import auth
from .client import split_agent
from .planner import Policy
from . import podruntime, podsource, source
from ..podcheckpoint import api as checkpoint_api
from .source import MigrationError, Request, SourceMigration
from .target import ID, Target, TargetError
from .transfer import TransferError

log = logging.getLogger(__name__)

TARGET = web.AppKey("migration_target", Target)
CONTEXT = web.AppKey("migration_context", object)
PEER_SILENCE = 15.0  # s without a byte from the target: the link is gone (then retried, then rolled back)


class MigrationContext:
    """What the endpoints need from the agent: who we are and how we reach peers."""

    def __init__(self, node: str, client_ssl, admins: frozenset[str] = frozenset({"operator", "admin"})):
        self.node = node
        self.client_ssl = client_ssl  # ssl.SSLContext with our certificate, verifying peers
        self.admins = admins  # client identities that may start migrations besides this node
        self.busy: set[int] = set()  # pids being migrated
        self.pods: dict[str, podsource.PodMigration] = {}  # pod migrations started here, by id
        self.lend_tracking = None  # set by setup()


def setup(app: web.Application, tls: pki.TlsFiles, lend_tracking=None) -> None:
    """Serve migrations on an agent that has mutual TLS (every route here is MEMORY).
    lend_tracking(pids, lend) -> awaitable: the agent's own tracking of pod processes stops
    (lend=True) for a pod migration's processes, which it tracks itself, and resumes after."""
    me = pki.identity_of(tls.cert.read_bytes())
    app[TARGET], app[CONTEXT] = Target(), MigrationContext(me.name, pki.client_context(tls))
    app[CONTEXT].lend_tracking = lend_tracking
    for line in app[TARGET].recover() + podsource.recover() + source.recover():
        log.warning("%s", line)
    base = "/api/v1/incoming/{id}"
    auth.add_routes(app, [
        web.post("/api/v1/migrations", start_migration),
        web.get("/api/v1/migrations/{id}", pod_status),
        web.post("/api/v1/migrations/{id}/complete", pod_complete),
        web.delete("/api/v1/migrations/{id}", pod_abort),
        web.post(base, incoming_create),
        web.get(base, incoming_status),
        web.delete(base, incoming_abort),
        web.get(base + "/layers/{layer}/files/{name}", incoming_held),
        web.put(base + "/layers/{layer}/files/{name}", incoming_file),
        web.post(base + "/layers/{layer}/commit", incoming_commit_layer),
        web.post(base + "/restore", incoming_restore),
        web.post(base + "/commit", incoming_commit),
    ], kind=auth.MEMORY)
    app.cleanup_ctx.append(_lease_keeper)


async def _lease_keeper(app: web.Application):
    async def loop():
        while True:
            await asyncio.sleep(2.0)
            try:
                await asyncio.to_thread(app[TARGET].expire)
            except Exception:  # noqa: BLE001 - keep the keeper alive
                log.exception("expiring incoming migrations failed")
    task = asyncio.create_task(loop())
    yield
    task.cancel()
    for mig in list(app[CONTEXT].pods.values()):  # shutting down: roll back what is not handed over
        if mig.phase not in podsource.ENDED:
            mig.abort("the source agent is stopping")
            if mig.phase == "HandedOver":
                mig.complete()
    await asyncio.gather(*(m.task for m in app[CONTEXT].pods.values() if m.task), return_exceptions=True)
    for inc in list(app[TARGET].active.values()):  # shutting down: nothing provisional stays
        await asyncio.to_thread(app[TARGET].abort, inc, "the agent is stopping")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ---- source side -------------------------------------------------------------------------

def _forbidden(request: web.Request, ctx: MigrationContext) -> web.Response | None:
    peer = auth.peer(request)
    caller = peer.name if peer else ""
    if caller != ctx.node and caller not in ctx.admins:
        return _error(403, f"{caller} may not start or drive migrations on {ctx.node}")
    return None


def _policy(body: dict) -> Policy:
    fields = {k: body[k] for k in Policy.__dataclass_fields__ if k in body}
    if "bandwidth" in body:  # MiB/s, as `memsnap migrate --bandwidth`
        fields["bandwidth_mib_s"] = float(body["bandwidth"])
    return Policy(**fields).check()


async def start_migration(request: web.Request) -> web.StreamResponse:
    ctx: MigrationContext = request.app[CONTEXT]
    if (refused := _forbidden(request, ctx)) is not None:
        return refused
    try:
        body = await request.json()
        if isinstance(body, dict) and "pod" in body:
            return await _start_pod(request, ctx, body)
        pid, to = int(body["pid"]), str(body["to"])
        policy = _policy(body)
    except (KeyError, ValueError, TypeError) as exc:
        return _error(400, f"bad migration request: {exc}")
    problem = _refuse(ctx, pid, to)
    if problem:
        return _error(*problem)
    host, port = split_agent(to)
    ctx.busy.add(pid)
    try:
        return await _run_streamed(request, ctx, pid, host, port, policy)
    finally:
        ctx.busy.discard(pid)


def _refuse(ctx: MigrationContext, pid: int, to: str) -> tuple[int, str] | None:
    if pid <= 1 or not procfs.alive(pid):
        return 404, f"no process with pid {pid} on {ctx.node}"
    if pid in ctx.busy:
        return 409, f"pid {pid} is already being migrated"
    return _refuse_target(ctx, to)


def _refuse_target(ctx: MigrationContext, to: str) -> tuple[int, str] | None:
    host, _ = split_agent(to)
    if host == ctx.node or _same_host(host, ctx.node):
        return 400, f"{to} is this node ({ctx.node}): a migration needs another node"
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        return 400, f"unknown node {host!r}: it does not resolve on {ctx.node}"
    return None


def _same_host(host: str, node: str) -> bool:
    try:
        mine = {a[4][0] for a in socket.getaddrinfo(node, None)}
        return bool(mine & {a[4][0] for a in socket.getaddrinfo(host, None)})
    except socket.gaierror:
        return False


async def _run_streamed(request, ctx, pid, host, port, policy) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)

    async def emit(event: dict) -> None:
        try:
            await resp.write((json.dumps(event) + "\n").encode())
        except (ConnectionError, RuntimeError):
            pass  # still_wanted() notices the client is gone

    def still_wanted() -> bool:
        return request.transport is not None and not request.transport.is_closing()

    req = Request(pid, host, port, policy)
    connector = aiohttp.TCPConnector(ssl=ctx.client_ssl)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=PEER_SILENCE)
    headers = {"X-Memsnap-Node": ctx.node}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        await emit({"event": "start", "id": req.id, "pid": pid, "source_node": ctx.node, "target_node": host})
        try:
            summary = await SourceMigration(req, session, emit, still_wanted).run()
        except (MigrationError, TransferError) as exc:
            await emit({"event": "error", "error": str(exc), "rolled_back": True})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            await emit({"event": "error", "error": _link_error(host, port, exc), "rolled_back": True})
        except Exception as exc:  # noqa: BLE001 - rolled back; the client must hear why
            log.exception("migration of pid %d failed", pid)
            await emit({"event": "error", "error": f"{type(exc).__name__}: {exc}", "rolled_back": True})
        else:
            await emit(summary)
    await resp.write_eof()
    return resp


# ---- pod migrations (source side) ---------------------------------------------------------

async def _start_pod(request: web.Request, ctx: MigrationContext, body: dict) -> web.Response:
    try:
        pod, to = body["pod"], str(body["to"])
        namespace, name, uid = str(pod["namespace"]), str(pod["name"]), str(pod["uid"])
        mig_id = str(body.get("id") or uuid.uuid4())
        target_pod = dict(body.get("targetPod") or {})
        policy = _policy(body)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        return _error(400, f"bad pod migration request: {exc!r} (want pod.namespace, pod.name, pod.uid, to)")
    if not ID.match(mig_id):
        return _error(400, f"bad migration id {mig_id!r}: lowercase letters, digits and '-', at most 63")
    if mig_id in ctx.pods:
        return _error(409, f"migration {mig_id} already exists on {ctx.node}")
    busy = [m.req.id for m in ctx.pods.values() if m.req.uid == uid and m.phase not in podsource.ENDED]
    if busy:
        return _error(409, f"pod {namespace}/{name} is already being migrated (migration {busy[0]})")
    containers = await asyncio.to_thread(podruntime.app_containers, uid)
    if not containers:
        return _error(404, f"no pod {namespace}/{name} (uid {uid}) with running containers on {ctx.node}")
    if not await checkpoint_api.release_pod(request.app, uid):  # its PodCheckpoint's trackers give way
        return _error(409, f"pod {namespace}/{name} is being checkpointed on {ctx.node}: try again")
    problem = _refuse_target(ctx, to)
    if problem:
        return _error(*problem)
    host, port = split_agent(to)
    req = podsource.PodRequest(mig_id, namespace, name, uid, host, port, policy, target_pod)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx.client_ssl),
                                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=PEER_SILENCE),
                                    headers={"X-Memsnap-Node": ctx.node})
    mig = podsource.PodMigration(req, ctx.node, containers, session, ctx.lend_tracking)
    ctx.pods[mig_id] = mig

    async def run() -> None:
        try:
            await mig.run()
        except Exception:  # noqa: BLE001 - run() reports its own failures in the status
            log.exception("pod migration %s", mig_id)
        finally:
            await session.close()
    mig.task = asyncio.create_task(run())
    log.info("pod migration %s of %s/%s to %s started", mig_id, namespace, name, host)
    return web.json_response({"id": mig_id, **mig.status()}, status=202)


def _pod_migration(request: web.Request) -> "podsource.PodMigration | web.Response":
    ctx: MigrationContext = request.app[CONTEXT]
    if (refused := _forbidden(request, ctx)) is not None:
        return refused
    mig = ctx.pods.get(request.match_info["id"])
    if mig is None:
        return _error(404, f"no migration {request.match_info['id']} on {ctx.node}")
    return mig


async def pod_status(request: web.Request) -> web.Response:
    mig = _pod_migration(request)
    return mig if isinstance(mig, web.Response) else web.json_response(mig.status())


async def pod_complete(request: web.Request) -> web.Response:
    mig = _pod_migration(request)
    if isinstance(mig, web.Response):
        return mig
    if mig.phase not in ("HandedOver", "Completed"):
        return _error(409, f"migration {mig.req.id} is {mig.phase}: only a handed-over migration completes")
    mig.complete()
    if mig.task is not None:
        await asyncio.wait([mig.task], timeout=30)
    return web.json_response(mig.status())


async def pod_abort(request: web.Request) -> web.Response:
    mig = _pod_migration(request)
    if isinstance(mig, web.Response):
        return mig
    if mig.phase in ("HandedOver", "Completed"):
        return _error(409, f"migration {mig.req.id} is {mig.phase}: the target holds the pod, too late to roll back")
    mig.abort("the migration was cancelled (DELETE)")
    if mig.task is not None:
        await asyncio.wait([mig.task], timeout=60)
    return web.json_response(mig.status())


def _link_error(host: str, port: int, exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"{host}:{port} presented a certificate that is not valid for {host} under our CA: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot reach the agent of {host} at {host}:{port}: {exc.os_error.strerror or exc.os_error}"
    return f"lost the link to {host}:{port}: {type(exc).__name__}: {exc}"


# ---- target side -------------------------------------------------------------------------

def _incoming(request: web.Request):
    source = auth.require_node(request)  # only nodes move memory to us, each its own
    return request.app[TARGET].get(request.match_info["id"], source)


def _target_errors(handler):
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except TargetError as exc:
            return _error(exc.status, str(exc))
    wrapped.__name__ = handler.__name__
    return wrapped


@_target_errors
async def incoming_create(request: web.Request) -> web.Response:
    source = auth.require_node(request)
    body = await request.json()
    inc = await asyncio.to_thread(request.app[TARGET].create, request.match_info["id"], source,
                                  str(body.get("container", "")), list(body.get("argv", [])),
                                  int(body.get("memory_bytes", 0)), body.get("pod"),
                                  [str(c) for c in body.get("containers", [])])
    return web.json_response(request.app[TARGET].status(inc), status=201)


@_target_errors
async def incoming_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[TARGET].status(_incoming(request)))


@_target_errors
async def incoming_abort(request: web.Request) -> web.Response:
    inc = _incoming(request)
    await asyncio.to_thread(request.app[TARGET].abort, inc, "the source asked")
    return web.json_response({"id": inc.id, "state": "aborted"})


@_target_errors
async def incoming_held(request: web.Request) -> web.Response:
    m = request.match_info
    size = request.app[TARGET].held(_incoming(request), m["layer"], m["name"])
    if size is None:
        return _error(404, f"{m['layer']}/{m['name']}: nothing received yet")
    return web.json_response({"size": size})


@_target_errors
async def incoming_file(request: web.Request) -> web.Response:
    m = request.match_info
    try:
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        return _error(400, "offset must be a number")
    size = await request.app[TARGET].receive(_incoming(request), m["layer"], m["name"], offset, request.content)
    return web.json_response({"size": size})


@_target_errors
async def incoming_commit_layer(request: web.Request) -> web.Response:
    inc = _incoming(request)
    text = await request.text()
    await asyncio.to_thread(request.app[TARGET].commit_layer, inc, request.match_info["layer"], text)
    return web.json_response({"layer": request.match_info["layer"], "committed": True})


@_target_errors
async def incoming_restore(request: web.Request) -> web.Response:
    inc = _incoming(request)
    layer = str((await request.json()).get("layer", "final"))
    result = await asyncio.to_thread(request.app[TARGET].restore, inc, layer)
    return web.json_response(result)


@_target_errors
async def incoming_commit(request: web.Request) -> web.Response:
    inc = _incoming(request)
    done = await asyncio.to_thread(request.app[TARGET].commit, inc)
    return web.json_response({"id": inc.id, "state": "committed", **done})
