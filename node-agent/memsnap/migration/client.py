"""Calling an agent's migration API from a node (the node's own certificate) or the host."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import AsyncIterator

import aiohttp

from .. import pki

NODE_TLS = Path(os.environ.get("MEMSNAP_TLS_DIR", "/etc/memsnap/tls"))


class ClientError(Exception):
    """The agent could not be asked; the message says which and why."""


def node_files(directory: Path = NODE_TLS) -> pki.TlsFiles:
    return pki.TlsFiles(directory / "node.crt", directory / "node.key", directory / "ca.crt")


def session(files: pki.TlsFiles) -> aiohttp.ClientSession:
    """A session that shows files' certificate; a node's also says which node it is."""
    try:
        ctx = pki.client_context(files)
        me = pki.identity_of(files.cert.read_bytes())
    except (pki.PkiError, OSError) as exc:
        raise ClientError(f"{exc} (is this a memsnap node with its certificate?)") from None
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                                 headers={"X-Memsnap-Node": me.name} if me.is_node else {})


async def migrate(agent: str, body: dict, files: pki.TlsFiles | None = None) -> AsyncIterator[dict]:
    """Start a migration on agent (HOST:PORT) and yield its events as they come."""
    url = f"https://{agent}/api/v1/migrations"
    async with session(files or node_files()) as s:
        try:
            async with s.post(url, json=body) as resp:
                if resp.status >= 400:
                    raise ClientError(await _reason(resp))
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ClientError(f"{agent}: its certificate is not valid for it under the memsnap CA "
                              f"({exc.certificate_error})") from None
        except aiohttp.ClientConnectorError as exc:
            raise ClientError(f"cannot reach the agent at {agent}: {exc.os_error.strerror or exc.os_error}") from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            raise ClientError(f"the agent at {agent} closed the connection mid-migration: {exc}") from None


async def _reason(resp: aiohttp.ClientResponse) -> str:
    try:
        return (await resp.json()).get("error") or resp.reason
    except (aiohttp.ContentTypeError, ValueError):
        return f"{resp.status} {resp.reason}"


