"""Layers between two real HTTP endpoints on loopback: a dropped connection resumes where the
target's copy ends, and a corrupted file is refused before the layer is published."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from memsnap.images.layer import LayerWriter, Manifest
from memsnap.migration import transfer


def make_layer(root: Path, name: str, sizes: dict[str, int]) -> Path:
    with LayerWriter(root / name) as out:
        for f, size in sizes.items():
            out.path(f).write_bytes(os.urandom(size))
        return out.commit(Manifest(kind="full", parent=None, pids=[1], backend="test", pages=0, bytes=0,
                                   described_pages=0))


def target_app(root: Path, drop_after: int | None) -> web.Application:
    """The target's two calls, served by transfer.receive_file/commit_layer; the first PUT is
    cut off after drop_after bytes (the connection dies mid-file)."""
    state = {"dropped": False}

    async def held(request):
        size = transfer.held(root, request.match_info["layer"], request.match_info["name"])
        return web.json_response({"size": size}) if size is not None else web.json_response({}, status=404)

    async def put(request):
        m = request.match_info
        if drop_after and not state["dropped"] and m["name"] == "pages-1.img":
            state["dropped"] = True
            data = await request.content.readexactly(drop_after)
            d = transfer.partial_dir(root, m["layer"])
            d.mkdir(parents=True, exist_ok=True)
            with open(d / m["name"], "ab") as f:
                f.write(data)
            request.transport.close()  # the link drops mid-file
            await asyncio.sleep(1)
        size = await transfer.receive_file(root, m["layer"], m["name"], int(request.query["offset"]), request.content)
        return web.json_response({"size": size})

    async def commit(request):
        try:
            transfer.commit_layer(root, request.match_info["layer"], await request.text(), set())
        except transfer.TransferError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        return web.json_response({})

    app = web.Application()
    base = "/m/layers/{layer}"
    app.router.add_get(base + "/files/{name}", held)
    app.router.add_put(base + "/files/{name}", put)
    app.router.add_post(base + "/commit", commit)
    return app


async def send(tmp_path: Path, layer: Path, drop_after: int | None, rate: float | None = None):
    target = tmp_path / "target"
    runner = web.AppRunner(target_app(target, drop_after))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as s:
            sent = await transfer.send_layer(s, f"http://127.0.0.1:{port}/m", layer, transfer.RateLimiter(rate))
    finally:
        await runner.cleanup()
    return target / layer.name, sent


def test_a_dropped_connection_resumes_and_the_layer_arrives_exact(tmp_path):
    layer = make_layer(tmp_path / "src", "l0", {"pages-1.img": 5 << 20, "pagemap-1.img": 3000, "empty.img": 0})
    got, sent = asyncio.run(send(tmp_path, layer, drop_after=2 << 20))
    for f in ("pages-1.img", "pagemap-1.img", "empty.img"):
        assert (got / f).read_bytes() == (layer / f).read_bytes(), f
    assert sent.bytes < (5 << 20) + 3000  # the 2 MiB held before the drop were not sent again
    assert oct((got / "pages-1.img").stat().st_mode & 0o777) == "0o600"


def test_a_file_that_does_not_match_its_sha256_is_refused(tmp_path):
    layer = make_layer(tmp_path / "src", "l0", {"pages-1.img": 1 << 20})
    target = tmp_path / "target"
    d = transfer.partial_dir(target, "l0")
    d.mkdir(parents=True)
    (d / "pages-1.img").write_bytes(os.urandom(1 << 20))  # what a bad link would have delivered
    with pytest.raises(transfer.TransferError, match="sha256"):
        transfer.commit_layer(target, "l0", (layer / "memsnap-layer.json").read_text(), set())
    assert not (target / "l0").exists()


def test_the_rate_limit_holds(tmp_path):
    layer = make_layer(tmp_path / "src", "l0", {"pages-1.img": 3 << 20})
    _, sent = asyncio.run(send(tmp_path, layer, drop_after=None, rate=8 << 20))
    assert sent.seconds >= ((3 << 20) - transfer.CHUNK) / (8 << 20) * 0.95  # less one chunk of burst
