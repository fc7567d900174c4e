"""Copies of a PodCheckpoint's checkpoints on a peer node, so that they outlive the pod's node.

After each checkpoint the pod's agent sends every checkpoint the peer lacks (oldest first; each
container's layers parent first) with the migration's resumable layer transfer
(transfer.send_layer), as a node to a node (mutual TLS, node certificates). The peer keeps them
in the same layout (store.py) and prunes to the same retention, flattening the same oldest
checkpoint, so its copy is a restorable chain too: GET, DELETE and restore of
/api/v1/checkpoints/{id} work there as on the pod's node.

Peer side (only nodes call these):
    GET  /api/v1/replicas/{id}                                          {"names": [...]}
    GET  /api/v1/replicas/{id}/{name}/layers/{layer}/files/{file}       {"size"} held
    PUT  /api/v1/replicas/{id}/{name}/layers/{layer}/files/{file}?offset=N
    POST /api/v1/replicas/{id}/{name}/layers/{layer}/commit             the layer's manifest
    POST /api/v1/replicas/{id}/{name}/commit                            {"meta", "retention"}
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path

import aiohttp
from aiohttp import web

from ..agent import auth
from ..images.layer import MANIFEST, Manifest
from ..migration import transfer
from . import store

LAYER = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.pre)?$")  # a container name, or its chain start
FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
PARENT = re.compile(r"^(\.\./[a-z0-9-]+\.pre|\.\./\.\./\d{8}t\d{6}-\d{3}z/[a-z0-9-]+)$")


# ---- sender (the pod's node) -------------------------------------------------------------

async def send_missing(session: aiohttp.ClientSession, peer_url: str, cid: str, retention: int) -> list[str]:
    """Send the peer every kept checkpoint of cid it does not hold; returns the names sent."""
    base = f"{peer_url}/api/v1/replicas/{cid}"
    async with session.get(base) as resp:
        await transfer._check(resp)
        held = set((await resp.json())["names"])
    sent = []
    limiter = transfer.RateLimiter(None)
    for name in store.names(cid):
        if name in held:
            continue
        d = store.root(cid) / name
        for layer in _layers_parent_first(d):
            await transfer.send_layer(session, f"{base}/{name}", layer, limiter)
        meta = json.loads((d / store.META).read_text())
        async with session.post(f"{base}/{name}/commit", json={"meta": meta, "retention": retention}) as resp:
            await transfer._check(resp)
        sent.append(name)
    return sent


def _layers_parent_first(d: Path) -> list[Path]:
    layers = sorted(p for p in d.iterdir() if p.is_dir() and LAYER.match(p.name))
    return sorted(layers, key=lambda p: not p.name.endswith(store.PRE))


# ---- receiver (the peer) -----------------------------------------------------------------

def routes() -> list[web.RouteDef]:
    base = "/api/v1/replicas/{id}"
    return [web.get(base, held_names),
            web.get(base + "/{name}/layers/{layer}/files/{file}", held_file),
            web.put(base + "/{name}/layers/{layer}/files/{file}", receive_file),
            web.post(base + "/{name}/layers/{layer}/commit", commit_layer),
            web.post(base + "/{name}/commit", commit)]


def _staging(request: web.Request, with_layer: bool = True) -> Path:
    auth.require_node(request)
    m = request.match_info
    ok = (store.ID.match(m["id"]) and store.NAME.match(m.get("name", "00000000t000000-000z"))
          and (not with_layer or LAYER.match(m["layer"])) and ("file" not in m or FILE.match(m["file"])))
    if not ok:
        raise web.HTTPBadRequest(text=json.dumps({"error": "bad checkpoint id, name, layer or file"}),
                                 content_type="application/json")
    d = store.root(m["id"]) / f".partial-{m['name']}"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(store.ROOT, 0o700)
    return d


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def held_names(request: web.Request) -> web.Response:
    auth.require_node(request)
    cid = request.match_info["id"]
    if not store.ID.match(cid):
        return _json_error(400, f"bad checkpoint id {cid!r}")
    return web.json_response({"names": store.names(cid)})


async def held_file(request: web.Request) -> web.Response:
    d, m = _staging(request), request.match_info
    size = transfer.held(d, m["layer"], m["file"])
    return _json_error(404, "nothing yet") if size is None else web.json_response({"size": size})


async def receive_file(request: web.Request) -> web.Response:
    d, m = _staging(request), request.match_info
    try:
        size = await transfer.receive_file(d, m["layer"], m["file"], int(request.query.get("offset", "0")),
                                           request.content)
    except transfer.TransferError as exc:
        return _json_error(409, str(exc))
    return web.json_response({"size": size})


async def commit_layer(request: web.Request) -> web.Response:
    d, layer = _staging(request), request.match_info["layer"]
    text = await request.text()
    try:
        await asyncio.to_thread(_commit_layer, d, layer, text)
    except transfer.TransferError as exc:
        return _json_error(422, str(exc))
    return web.json_response({"layer": layer, "committed": True})


def _commit_layer(root: Path, layer: str, manifest_json: str) -> None:
    """As transfer.commit_layer, but the parent may be the chain start beside it or the same
    container in an earlier checkpoint, which this node must already hold."""
    d = transfer.partial_dir(root, layer)
    manifest = Manifest(**json.loads(manifest_json))
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, want in manifest.files.items():
        if "/" in name or not (d / name).exists() or transfer._digest(d / name) != want:
            raise transfer.TransferError(f"{layer}/{name} was not received whole")
    if manifest.parent is not None:
        if not PARENT.match(manifest.parent) or not Path(os.path.normpath(root / layer / manifest.parent)).is_dir():
            raise transfer.TransferError(f"{layer}: parent {manifest.parent!r} is not held here")
        os.symlink(manifest.parent, d / "parent")
    (d / MANIFEST).write_text(manifest.to_json())
    os.chmod(d / MANIFEST, 0o600)
    shutil.rmtree(root / layer, ignore_errors=True)  # a resend after a lost answer
    os.rename(d, root / layer)


async def commit(request: web.Request) -> web.Response:
    d = _staging(request, with_layer=False)
    m = request.match_info
    body = await request.json()
    final = store.root(m["id"]) / m["name"]
    meta = dict(body["meta"])
    meta["replicaOf"] = request.headers.get(auth.NODE_HEADER, "")
    store.write_meta(d, meta)
    if final.exists():
        shutil.rmtree(d)
    else:
        os.rename(d, final)
    pruned = await asyncio.to_thread(store.prune, m["id"], int(body.get("retention", 3)))
    return web.json_response({"name": m["name"], "pruned": pruned})
