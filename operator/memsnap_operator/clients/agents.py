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
CHECKPOINTS = "/api/v1/checkpoints"
CHECKPOINT_TIMEOUT = 600.0  # s: one checkpoint of a large pod (the first dumps all its memory)


class Agents:
    """One TLS session per agent, reused across calls; close() at the end."""

    def __init__(self, files: pki.TlsFiles, port: int = PORT, timeout: float = 10.0):
        self.files, self.port, self.timeout = files, port, timeout
        self._clients: dict[tuple[str, str, float], AgentClient] = {}

    def _client(self, node: str, address: str, timeout: float | None = None) -> AgentClient:
        key = (node, address, timeout or self.timeout)
        if key not in self._clients:
            self._clients[key] = AgentClient(node, self.port, files=self.files, address=address,
                                             timeout=timeout or self.timeout)
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

    # ---- PodCheckpoints (the pod's node) ----------------------------------------------------

    async def checkpoint(self, node: str, address: str, request: dict[str, Any]) -> dict:
        """One checkpoint of the pod, pruned to retention: {"name", "time", "size", "layers"}."""
        return await self._client(node, address, CHECKPOINT_TIMEOUT).call_json("POST", CHECKPOINTS, json=request)

    async def checkpoints(self, node: str, address: str, checkpoint_id: str) -> list[dict]:
        return (await self._client(node, address).get_json(f"{CHECKPOINTS}/{checkpoint_id}"))["checkpoints"]

    async def delete_checkpoints(self, node: str, address: str, checkpoint_id: str) -> bool:
        """Tracking ended and every image removed; False when there were none."""
        return bool((await self._client(node, address, 120.0).call_json(
            "DELETE", f"{CHECKPOINTS}/{checkpoint_id}")).get("removed"))

    async def restore_checkpoint(self, node: str, address: str, checkpoint_id: str, as_id: str) -> dict:
        """The newest checkpoint staged on node for a pod annotated memsnap.io/restore-from=as_id."""
        return await self._client(node, address, CHECKPOINT_TIMEOUT).call_json(
            "POST", f"{CHECKPOINTS}/{checkpoint_id}/restore", json={"as": as_id})

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
