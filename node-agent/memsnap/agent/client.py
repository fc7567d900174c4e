"""Calling an agent over mutual TLS.

    async with AgentClient.in_node("node-2") as agent:       # inside a node: the node's own cert
        status = await agent.get_json("/api/v1/status")

From the host: memsnap.nodes.agents.client("node-2") (a host client identity, e.g. admin).

The client trusts only the memsnap CA and checks that the server's certificate names the node
it asked for, whatever address it connects to. A client holding a node certificate says which
node it is (X-Memsnap-Node), as calls that move memory require.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from .. import pki
from .auth import NODE_HEADER

PORT = 9650
# Where `memsnap nodes up` (and the DaemonSet) put a node's own identity.
NODE_TLS_DIR = Path("/etc/memsnap/tls")
NODE_FILES = pki.TlsFiles(NODE_TLS_DIR / "node.crt", NODE_TLS_DIR / "node.key", NODE_TLS_DIR / "ca.crt")


class AgentError(Exception):
    """An agent could not be reached, refused the connection or answered with an error."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # HTTP status, None when no answer came


class AgentClient:
    """An aiohttp session to one agent, as one TLS identity. Use as an async context manager."""

    def __init__(self, node: str, port: int = PORT, *, files: pki.TlsFiles, address: str | None = None,
                 timeout: float = 30.0):
        self.node, self.port = node, port
        self.address = address or node  # node names resolve inside nodes (/etc/hosts)
        self.files = files
        self.identity = pki.identity_of(files.cert.read_bytes())
        self._ssl = pki.client_context(files)
        # No total: a layer may stream for minutes; a peer silent for `timeout` seconds is gone.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def in_node(cls, node: str, port: int = PORT, **kwargs) -> AgentClient:
        """A client inside a node, calling `node`'s agent as this node."""
        return cls(node, port, files=NODE_FILES, **kwargs)

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}:{self.port}"

    @property
    def session(self) -> aiohttp.ClientSession:
        """The underlying session (for streaming); made on first use."""
        if self._session is None:
            headers = {NODE_HEADER: self.identity.name} if self.identity.is_node else {}
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl),
                                                  timeout=self._timeout, headers=headers)
        return self._session

    def request(self, method: str, path: str, **kwargs):
        """session.request to the agent, TLS-checked against the node's name (async with ...)."""
        return self.session.request(method, self.base_url + path, server_hostname=self.node, **kwargs)

    async def get_json(self, path: str) -> Any:
        """GET path and return its JSON; AgentError on a refusal, an error status or no answer."""
        return await self.call_json("GET", path)

    async def call_json(self, method: str, path: str, **kwargs) -> Any:
        try:
            async with self.request(method, path, **kwargs) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise AgentError(f"{self.node}: {method} {path}: {resp.status} {_reason(text)}", resp.status)
                return json.loads(text)
        except aiohttp.ClientSSLError as exc:
            raise AgentError(f"{self.node}: TLS refused: {_ssl_reason(exc)}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise AgentError(f"{self.node} at {self.address}:{self.port}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _reason(text: str) -> str:
    try:
        return json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return text.strip().splitlines()[0] if text.strip() else "(no reason given)"


def _ssl_reason(exc: aiohttp.ClientSSLError) -> str:
    inner = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
    return getattr(inner, "verify_message", None) or getattr(inner, "reason", None) or str(inner)
