"""Starting a migration on an agent and following it (what `memsnap migrate` does)."""
from __future__ import annotations

import json
from typing import AsyncIterator

import aiohttp

from .. import pki
from ..agent.client import PORT, AgentClient, _ssl_reason


class ClientError(Exception):
    """The agent could not be asked; the message says which and why."""


def split_agent(agent: str) -> tuple[str, int]:
    """NODE[:PORT] -> (NODE, PORT), the agents' port when none is given."""
    host, sep, port = agent.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() else (agent, PORT)


async def migrate(agent: str, body: dict, files: pki.TlsFiles | None = None) -> AsyncIterator[dict]:
    """Start a migration on agent (NODE[:PORT]) and yield its events as they come. Inside a
    node the node's own certificate is the caller; elsewhere pass an identity's files."""
    host, port = split_agent(agent)
    try:
        client = AgentClient(host, port, files=files) if files else AgentClient.in_node(host, port)
    except (pki.PkiError, OSError) as exc:
        raise ClientError(f"{exc} (is this a memsnap node with its certificate?)") from None
    async with client:
        try:
            # No read timeout: a round may be silent for long (a slow link); the agent ends the
            # stream with "done" or "error" whatever happens.
            async with client.request("POST", "/api/v1/migrations", json=body,
                                      timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as resp:
                if resp.status >= 400:
                    raise ClientError(await _reason(resp))
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except aiohttp.ClientSSLError as exc:
            raise ClientError(f"{agent}: TLS refused: {_ssl_reason(exc)}") from None
        except aiohttp.ClientConnectorError as exc:
            raise ClientError(f"cannot reach the agent at {agent}: {exc.os_error.strerror or exc.os_error}") from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            raise ClientError(f"the agent at {agent} closed the connection mid-migration: {exc}") from None


async def _reason(resp: aiohttp.ClientResponse) -> str:
    try:
        return (await resp.json()).get("error") or resp.reason
    except (aiohttp.ContentTypeError, ValueError):
        return f"{resp.status} {resp.reason}"

