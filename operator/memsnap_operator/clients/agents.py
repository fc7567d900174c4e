"""The node agents' migration API, over mutual TLS as the operator's client identity.

The engine lives in the agents (node-agent's memsnap.migration); this only drives it:
start a pod migration on the source node's agent, follow it, complete or abort it.
"""
from __future__ import annotations

from typing import Any

from memsnap import pki
from memsnap.agent.client import PORT, AgentClient, AgentError

__all__ = ["AgentError", "Agents", "PORT"]

BASE = "/api/v1/migrations"


class Agents:
    """One TLS session per agent, reused across calls; close() at the end."""

    def __init__(self, files: pki.TlsFiles, port: int = PORT, timeout: float = 10.0):
        self.files, self.port, self.timeout = files, port, timeout
        self._clients: dict[tuple[str, str], AgentClient] = {}

    def _client(self, node: str, address: str) -> AgentClient:
        key = (node, address)
        if key not in self._clients:
            self._clients[key] = AgentClient(node, self.port, files=self.files, address=address,
                                             timeout=self.timeout)
        return self._clients[key]

    async def start(self, node: str, address: str, request: dict[str, Any]) -> dict:
        """POST the migration to the source node's agent: 202 {"id"} at once."""
        return await self._client(node, address).call_json("POST", BASE, json=request)

    async def get(self, node: str, address: str, migration_id: str) -> dict:
        """Its progress (phase, iterations, bytes, rates, downtime, message)."""
        return await self._client(node, address).get_json(f"{BASE}/{migration_id}")

    async def complete(self, node: str, address: str, migration_id: str) -> dict:
        """After the source pod is deleted: the agent ends the frozen source copy."""
        return await self._client(node, address).call_json("POST", f"{BASE}/{migration_id}/complete")

    async def abort(self, node: str, address: str, migration_id: str) -> bool:
        """Roll back (source thawed, target emptied); False when the agent knows no such id."""
        try:
            await self._client(node, address).call_json("DELETE", f"{BASE}/{migration_id}")
            return True
        except AgentError as exc:
            if exc.status == 404:
                return False
            raise

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
