"""Moving layers between agents: streamed, rate-limited, resumable, checked.

The sender PUTs the files of a committed layer, a few at a time, each in chunks read from disk
as the socket takes them (TCP back-pressure: a slow target never makes the source hold a layer
in memory), at an optional rate limit, then POSTs the manifest. An interrupted file resumes
where the target's copy ends (the target says how much it holds). The target writes files aside, checks every
sha256 against the manifest before it publishes the layer, and keeps them root-only.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..images.layer import MANIFEST, Manifest, file_digest, read_manifest

CHUNK = 1 << 20
RETRIES = 5
PARALLEL_FILES = 4


class TransferError(Exception):
    """A layer could not be moved; the message names the file and the cause."""


class RateLimiter:
    """A token bucket: at most rate bytes per second, bursts of one chunk."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self._next = time.monotonic()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self._next = max(self._next, now) + n / self.rate
        delay = self._next - now - n / self.rate
        if delay > 0:
            await asyncio.sleep(delay)


# ---- sender ------------------------------------------------------------------------------

@dataclass
class Sent:
    bytes: int
    seconds: float


async def send_layer(session: aiohttp.ClientSession, base: str, layer: Path,
                     limiter: RateLimiter, retries: int = RETRIES) -> Sent:
    """Send one committed layer to base (…/migrations/ID) under its own name: its files side
    by side (a final layer is a few dozen small files, sent while the workload stands still),
    then the manifest."""
    began = time.monotonic()
    manifest = read_manifest(layer)
    url = f"{base}/layers/{layer.name}"
    lanes = asyncio.Semaphore(PARALLEL_FILES)

    async def one(name: str) -> int:
        async with lanes:
            return await _send_file(session, f"{url}/files/{name}", layer / name, limiter, retries)
    sent = sum(await asyncio.gather(*(one(name) for name in sorted(manifest.files))))
    await _post(session, f"{url}/commit", manifest.to_json())
    return Sent(sent, time.monotonic() - began)


async def _send_file(session, url: str, path: Path, limiter: RateLimiter, retries: int) -> int:
    size = path.stat().st_size
    offset: int | None = 0  # a layer is sent once: the target holds nothing of it, no need to ask
    last: Exception | None = None
    for attempt in range(retries):
        try:
            if offset is None:  # after a failure: ask where the target's copy ends, go on from there
                held = await _remote_size(session, url)
                if held is not None and held > size:
                    raise TransferError(f"the target holds more of {path.name} than there is ({held} > {size})")
                if held == size:
                    return 0
                offset = held or 0  # None: nothing yet (an empty file is still sent, to exist there)
            async with session.put(url, params={"offset": str(offset)}, data=_chunks(path, offset, limiter),
                                   headers={"Content-Length": str(size - offset)}) as resp:
                if resp.status == 409 and attempt + 1 < retries:  # it holds part of it after all
                    offset, last = None, TransferError(f"target answered 409 for {path.name}")
                    continue
                await _check(resp)
            return size - offset
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
            offset, last = None, exc  # the link dropped mid-file
            await asyncio.sleep(min(0.2 * 2 ** attempt, 2.0))
    raise TransferError(f"sending {path.name} failed {retries} times: {_describe(last)}")


async def _chunks(path: Path, offset: int, limiter: RateLimiter):
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK):
            await limiter.take(len(chunk))
            yield chunk


async def _remote_size(session, url: str) -> int | None:
    async with session.get(url) as resp:
        if resp.status == 404:
            return None
        await _check(resp)
        return int((await resp.json())["size"])


async def _post(session, url: str, body: str) -> dict:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        await _check(resp)
        return await resp.json()


async def _check(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    try:
        reason = (await resp.json()).get("error", "")
    except (aiohttp.ContentTypeError, ValueError):
        reason = (await resp.text())[:200]
    raise TransferError(f"target answered {resp.status}: {reason or resp.reason}")


def _describe(exc: Exception | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc else "unknown error"


# ---- receiver ----------------------------------------------------------------------------

class NoSpace(TransferError):
    """The target's disk is full."""


def partial_dir(root: Path, layer: str) -> Path:
    return root / f".{layer}.partial"


def held(root: Path, layer: str, name: str) -> int | None:
    """How many bytes of a file the target holds (None when it has none)."""
    try:
        return (partial_dir(root, layer) / name).stat().st_size
    except FileNotFoundError:
        return None


_running: dict[str, "hashlib._Hash"] = {}  # path -> sha256 of what it holds, as it was received


async def receive_file(root: Path, layer: str, name: str, offset: int, content) -> int:
    """Append a streamed body at offset (which must be where our copy ends). Returns the size.

    Writing and hashing run in a worker thread, one chunk behind the socket: on two cores
    the event loop decrypts the next chunk while the last one is hashed and written, and the
    sha256 the commit checks is ready without reading the file again.
    """
    d = partial_dir(root, layer)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / name
    have = held(root, layer, name) or 0
    if offset != have:
        raise TransferError(f"{name}: offset {offset} does not match the {have} bytes held")
    digest = _running.pop(str(path), None)
    if digest is None or have:  # resuming: hash what an interrupted upload left
        digest = _hash_file(path) if have else hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    loop = asyncio.get_running_loop()
    pending = None
    try:
        os.fchmod(fd, 0o600)  # process memory: root-only, whoever made the file
        async for chunk in content.iter_chunked(CHUNK):
            if pending is not None:
                await pending
            pending = loop.run_in_executor(None, _write_and_hash, fd, digest, chunk)
        if pending is not None:
            await pending
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left on the target writing {layer}/{name}") from None
        raise
    finally:
        if pending is not None and not pending.done():
            await asyncio.wait([pending])
        os.close(fd)
    size = path.stat().st_size
    _running[str(path)] = digest
    return size


def _write_and_hash(fd: int, digest, data: bytes) -> None:
    _write_all(fd, data)
    digest.update(data)


def _hash_file(path: Path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


def _digest(path: Path) -> dict:
    """The file's sha256 and size: from the receive when it covered the whole file."""
    running = _running.pop(str(path), None)
    size = path.stat().st_size
    if running is None:
        return file_digest(path)
    return {"sha256": running.hexdigest(), "size": size}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def commit_layer(root: Path, layer: str, manifest_json: str, known_layers: set[str],
                 durable: bool = True) -> Manifest:
    """Check every file against the manifest, link the parent, publish the layer (fsynced
    first unless durable=False: see images.layer.LayerWriter)."""
    d = partial_dir(root, layer)
    try:
        manifest = Manifest(**json.loads(manifest_json))
    except (TypeError, ValueError) as exc:
        raise TransferError(f"{layer}: bad manifest: {exc}") from None
    if not d.is_dir():
        d.mkdir(mode=0o700, parents=True)  # a layer may hold no file but its manifest
    for name, want in manifest.files.items():
        path = d / name
        if "/" in name or not path.exists():
            raise TransferError(f"{layer}/{name} was not received")
        if _digest(path) != want:
            raise TransferError(f"{layer}/{name} does not match its sha256 in the manifest")
    if manifest.parent is not None:
        parent = manifest.parent.removeprefix("../")
        if parent not in known_layers or "/" in parent:
            raise TransferError(f"{layer}: parent {manifest.parent!r} is not a layer of this migration")
        os.symlink(manifest.parent, d / "parent")
    (d / MANIFEST).write_text(manifest.to_json())
    os.chmod(d / MANIFEST, 0o600)
    if durable:
        _fsync_tree(d)
    target = root / layer
    if target.exists():
        raise TransferError(f"{layer} was already committed")
    os.rename(d, target)
    return manifest


def _fsync_tree(d: Path) -> None:
    for p in [*(x for x in d.iterdir() if x.is_file() and not x.is_symlink()), d]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

