"""The agent's pod checkpoint endpoints (a PodCheckpoint's node side). Mutual TLS only, and only
for this node or an admin identity (the operator), as the migration endpoints:

    POST   /api/v1/checkpoints               {"pod": {"namespace", "name", "uid"}, "id", "retention"}
                                             -> {"name", "time", "size", "layers", ...}: one checkpoint
                                             of every app container (blocks until written); 409 while
                                             one of that id is being taken
    GET    /api/v1/checkpoints/{id}          {"id", "checkpoints": [{"name", "time", "size", "layers"}]}
    DELETE /api/v1/checkpoints/{id}          tracking ended, every image removed; {"removed": bool}
                                             (idempotent)
    POST   /api/v1/checkpoints/{id}/restore  {"as": restore id, "checkpoint": name (default newest)}:
                                             each container's chain flattened into
                                             incoming/<as>/<container>/ and marked ready, so a pod
                                             with runtimeClassName memsnap and annotation
                                             memsnap.io/restore-from=<as> on this node is restored
                                             from it by memsnap-runc (the images go once it did)
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from .. import pki
from ..agent import auth
from ..images import chain
from ..images.layer import LayerError
from ..migration import podtarget
from ..migration.client import split_agent
from ..migration.target import ID as RESTORE_ID, INCOMING
from . import engine, replica, store

log = logging.getLogger(__name__)

CTX = web.AppKey("checkpoint_context", object)
RESTORE_KEEP = 300.0  # s a restore's flattened images wait for memsnap-runc before they go


class Context:
    def __init__(self, node: str, lend_tracking, client_ssl, admins: frozenset[str] = frozenset({"operator", "admin"})):
        self.node, self.lend_tracking, self.client_ssl, self.admins = node, lend_tracking, client_ssl, admins
        self.chains: dict[str, engine.PodChain] = {}
        self.busy: set[str] = set()
        self.cleanups: set[asyncio.Task] = set()  # staged restores waiting to be dropped


def setup(app: web.Application, tls: pki.TlsFiles, lend_tracking=None) -> None:
    app[CTX] = Context(pki.identity_of(tls.cert.read_bytes()).name, lend_tracking, pki.client_context(tls))
    for line in engine.recover():
        log.warning("%s", line)
    auth.add_routes(app, [
        web.post("/api/v1/checkpoints", take),
        web.get("/api/v1/checkpoints/{id}", list_),
        web.delete("/api/v1/checkpoints/{id}", delete),
        web.post("/api/v1/checkpoints/{id}/restore", restore),
        *replica.routes(),
    ], kind=auth.MEMORY)
    app.on_shutdown.append(_release_all)


async def _release_all(app: web.Application) -> None:
    for ch in app[CTX].chains.values():  # the trackers' fds close with us anyway; say it cleanly
        await asyncio.to_thread(ch.release)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _allowed(request: web.Request) -> Context | web.Response:
    ctx: Context = request.app[CTX]
    caller = (auth.peer(request).name if auth.peer(request) else "")
    if caller != ctx.node and caller not in ctx.admins:
        return _error(403, f"{caller} may not checkpoint pods on {ctx.node}")
    cid = request.match_info.get("id")
    if cid is not None and not store.ID.match(cid):
        return _error(400, f"bad checkpoint id {cid!r}: lowercase letters, digits and '-', at most 63")
    return ctx


async def take(request: web.Request) -> web.Response:
    ctx = _allowed(request)
    if isinstance(ctx, web.Response):
        return ctx
    try:
        body = await request.json()
        pod, cid = body["pod"], str(body["id"])
        namespace, name, uid = str(pod["namespace"]), str(pod["name"]), str(pod["uid"])
        retention = int(body.get("retention", 3))
        peer = str(body.get("replicateTo") or "")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        return _error(400, f"bad checkpoint request: {exc!r} (want pod.namespace, pod.name, pod.uid, id, retention)")
    if not store.ID.match(cid):
        return _error(400, f"bad checkpoint id {cid!r}: lowercase letters, digits and '-', at most 63")
    if retention < 1:
        return _error(400, f"retention must be at least 1, not {retention}")
    if cid in ctx.busy:
        return _error(409, f"checkpoint {cid} is already being taken on {ctx.node}")
    ch = ctx.chains.get(cid)
    if ch is not None and ch.uid != uid:  # the same PodCheckpoint now names another pod
        await asyncio.to_thread(ch.release)
        ch = None
    if ch is None:
        ch = ctx.chains[cid] = engine.PodChain(cid, namespace, name, uid)
    ctx.busy.add(cid)
    try:
        if ctx.lend_tracking is not None:  # the agent's own tracking of the pod steps aside for ours
            await ctx.lend_tracking({uid}, True)
        result = await asyncio.to_thread(ch.take, retention)
        if peer:
            result["replica"] = await _replicate(ctx, cid, peer, retention)
    except engine.CheckpointError as exc:
        log.warning("checkpoint %s of %s/%s failed: %s", cid, namespace, name, exc)
        return _error(exc.status, str(exc))
    except Exception as exc:  # noqa: BLE001 - the caller must hear why
        log.exception("checkpoint %s of %s/%s", cid, namespace, name)
        return _error(500, f"checkpoint of pod {namespace}/{name} failed: {type(exc).__name__}: {exc}")
    finally:
        ctx.busy.discard(cid)
    log.info("checkpoint %s of %s/%s: %s (%d bytes, %d layers, pause %s ms)", cid, namespace, name,
             result["name"], result["size"], result["layers"], result.get("pauseMs"))
    return web.json_response(result, status=201)


async def _replicate(ctx: Context, cid: str, peer: str, retention: int) -> dict:
    """Every kept checkpoint the peer lacks, sent to it; a failure is reported, not fatal (the
    checkpoint is taken; the next one sends what is missing)."""
    host, port = split_agent(peer)
    if host == ctx.node:
        return {"node": host, "ok": False, "error": "a replica must be on another node"}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx.client_ssl),
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
                                         headers={auth.NODE_HEADER: ctx.node}) as session:
            sent = await replica.send_missing(session, f"https://{host}:{port}", cid, retention)
    except Exception as exc:  # noqa: BLE001 - said in the answer; the next checkpoint tries again
        log.warning("checkpoint %s: replication to %s failed: %s", cid, host, exc)
        return {"node": host, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"node": host, "ok": True, "sent": sent}


async def release_pod(app: web.Application, uid: str) -> bool:
    """A migration of pod uid takes over its tracking: our trackers go (the next checkpoint
    starts a new chain). False while a checkpoint of it is being taken."""
    ctx: Context | None = app.get(CTX)
    if ctx is None:
        return True
    mine = [ch for ch in ctx.chains.values() if ch.uid == uid]
    if any(ch.id in ctx.busy for ch in mine):
        return False
    for ch in mine:
        await asyncio.to_thread(ch.release)
    return True


async def list_(request: web.Request) -> web.Response:
    ctx = _allowed(request)
    if isinstance(ctx, web.Response):
        return ctx
    cid = request.match_info["id"]
    return web.json_response({"id": cid, "node": ctx.node, "checkpoints": await asyncio.to_thread(store.listing, cid)})


async def delete(request: web.Request) -> web.Response:
    ctx = _allowed(request)
    if isinstance(ctx, web.Response):
        return ctx
    cid = request.match_info["id"]
    if cid in ctx.busy:
        return _error(409, f"checkpoint {cid} is being taken on {ctx.node}: try again")
    ch = ctx.chains.pop(cid, None)
    if ch is not None:
        await asyncio.to_thread(ch.release)
        if ctx.lend_tracking is not None and not any(c.uid == ch.uid for c in ctx.chains.values()):
            await ctx.lend_tracking({ch.uid}, False)
    removed = await asyncio.to_thread(store.remove, cid)
    return web.json_response({"id": cid, "removed": removed})


async def restore(request: web.Request) -> web.Response:
    ctx = _allowed(request)
    if isinstance(ctx, web.Response):
        return ctx
    cid = request.match_info["id"]
    try:
        body = await request.json()
        rid = str(body["as"])
        wanted = body.get("checkpoint")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        return _error(400, f"bad restore request: {exc!r} (want as, and optionally checkpoint)")
    if not RESTORE_ID.match(rid):
        return _error(400, f"bad restore id {rid!r}: lowercase letters, digits and '-', at most 63")
    names = store.names(cid)
    name = str(wanted) if wanted else (names[-1] if names else None)
    if name is None or name not in names:
        return _error(404, f"no checkpoint {name or ''} of {cid} on {ctx.node}".replace("  ", " "))
    dest = INCOMING / rid
    if dest.exists():
        return _error(409, f"{rid} is already an incoming restore or migration on {ctx.node}")
    try:
        containers = await asyncio.to_thread(_stage, cid, name, dest)
    except (LayerError, OSError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        return _error(500, f"cannot stage checkpoint {name} of {cid} for restore: {exc}")
    task = asyncio.get_running_loop().create_task(_drop_when_restored(dest, containers))
    ctx.cleanups.add(task)
    task.add_done_callback(ctx.cleanups.discard)
    return web.json_response({"restoreId": rid, "checkpoint": name, "containers": containers}, status=201)


def _stage(cid: str, name: str, dest: Path) -> list[str]:
    """Each container's chain as one self-contained image where memsnap-runc looks."""
    INCOMING.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest.mkdir(mode=0o700)
    containers = store.containers_of(cid, name)
    for c in containers:
        chain.flatten(store.final_dir(cid, name, c), dest / c)
    for c in containers:
        (dest / c / podtarget.READY).write_text("")
    return containers


async def _drop_when_restored(dest: Path, containers: list[str]) -> None:
    deadline = time.monotonic() + RESTORE_KEEP
    while time.monotonic() < deadline:
        if all((dest / c / podtarget.RESULT).exists() for c in containers):
            break
        await asyncio.sleep(0.5)
    await asyncio.to_thread(shutil.rmtree, dest, True)
