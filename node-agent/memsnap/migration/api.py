"""The agent's migration endpoints. Every one of them moves, restores or deletes memory, so
every one needs mutual TLS: the peer's certificate names who calls.

Source side (called by `memsnap migrate` on this node, or the operator):
    POST   /api/v1/migrations                 {"pid", "to", policy...} -> NDJSON events, last "done" or "error"
Target side (called by the source node's agent; only that node may drive its migration):
    POST   /api/v1/incoming/{id}              {"container", "argv", "memory_bytes"}
    GET    /api/v1/incoming/{id}              state
    DELETE /api/v1/incoming/{id}              abort: no restored process, no images left
    GET    /api/v1/incoming/{id}/layers/{layer}/files/{name}         {"size": bytes held}
    PUT    /api/v1/incoming/{id}/layers/{layer}/files/{name}?offset=N  streamed body
    POST   /api/v1/incoming/{id}/layers/{layer}/commit               the layer's manifest
    POST   /api/v1/incoming/{id}/restore      {"layer"} -> {"pid", "restore_seconds"}
    POST   /api/v1/incoming/{id}/commit       the source has handed over; answers within 5 s:
                                              {"state": "filling", progress} (ask again) or
                                              {"state": "committed", "fill_seconds"}
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket

import aiohttp
from aiohttp import web

from .. import pki, procfs
from ..agent import auth
from .client import split_agent
from .planner import Policy
from . import source
from .source import MigrationError, Request, SourceMigration
from .target import Target, TargetError
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


def setup(app: web.Application, tls: pki.TlsFiles) -> None:
    """Serve migrations on an agent that has mutual TLS (every route here is MEMORY)."""
    me = pki.identity_of(tls.cert.read_bytes())
    app[TARGET], app[CONTEXT] = Target(), MigrationContext(me.name, pki.client_context(tls))
    for line in app[TARGET].recover() + source.recover():
        log.warning("%s", line)
    base = "/api/v1/incoming/{id}"
    auth.add_routes(app, [
        web.post("/api/v1/migrations", start_migration),
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
    for inc in list(app[TARGET].active.values()):  # shutting down: nothing provisional stays
        await asyncio.to_thread(app[TARGET].abort, inc, "the agent is stopping")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ---- source side -------------------------------------------------------------------------

async def start_migration(request: web.Request) -> web.StreamResponse:
    ctx: MigrationContext = request.app[CONTEXT]
    peer = auth.peer(request)
    caller = peer.name if peer else ""
    if caller != ctx.node and caller not in ctx.admins:
        return _error(403, f"{caller} may not start migrations on {ctx.node}")
    try:
        body = await request.json()
        pid, to = int(body["pid"]), str(body["to"])
        policy = Policy(**{k: body[k] for k in Policy.__dataclass_fields__ if k in body}).check()
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
    host, _ = split_agent(to)
    if pid <= 1 or not procfs.alive(pid):
        return 404, f"no process with pid {pid} on {ctx.node}"
    if pid in ctx.busy:
        return 409, f"pid {pid} is already being migrated"
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
                                  int(body.get("memory_bytes", 0)))
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
