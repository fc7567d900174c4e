"""`memsnap agent` in every local node, as the DaemonSet runs it on a cluster node.

`memsnap nodes up` gives each node it starts a key and certificate from the host's memsnap CA
(/etc/memsnap/tls/{node.crt,node.key,ca.crt} in the node, root-only), starts the agent on the
node's address (mutual TLS on port 9650, plain /metrics, /healthz, /readyz on 9651), with its
output in the node's /var/log/memsnap-agent.log, and waits until each answers /healthz over TLS.
Nothing restarts an agent: a killed one stays dead until the node is renewed (down, up).

From the host, client(NODE) calls a node's agent as a host identity (default "admin").
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from memsnap import pki
from memsnap.agent.client import NODE_FILES, NODE_TLS_DIR, PORT, AgentClient, AgentError
from memsnap.nodes import cgroups, runtime

LOG = "/var/log/memsnap-agent.log"
HOST_IDENTITY = "admin"
READY_TIMEOUT = 90.0  # a cold python3 + aiohttp import in a node under load takes a few seconds


def client(node: str, identity: str = HOST_IDENTITY, port: int = PORT, **kwargs) -> AgentClient:
    """A client on the host for node's agent, as the host identity `identity` (issued on first use)."""
    return AgentClient(node, port, files=pki.client_files(identity), address=runtime.get(node).address, **kwargs)


def start(nodes: Sequence[runtime.Node], timeout: float = READY_TIMEOUT) -> None:
    """Give each node its identity, start its agent, and wait until every one answers."""
    if not nodes:
        return
    ca = pki.CA.ensure()
    for node in nodes:
        install_identity(node, ca)
        _launch(node)
    asyncio.run(_wait_answering(nodes, timeout))


def install_identity(node: runtime.Node, ca: pki.CA) -> None:
    """A fresh key and certificate naming the node (DNS:name, IP:address), written root-only in it."""
    creds = ca.issue_node(node.name, node.address)
    script = 'umask 077 && mkdir -p "$1" && chmod 700 "$1" && cat > "$1/$2" && chmod 600 "$1/$2"'
    for path, data in ((NODE_FILES.key, creds.key), (NODE_FILES.ca, ca.cert_pem), (NODE_FILES.cert, creds.cert)):
        proc = runtime.run(node.name, ["sh", "-c", script, "sh", str(NODE_TLS_DIR), path.name], input=data,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise runtime.NodeError(f"cannot install {path} in {node.name}: {proc.stderr.decode().strip()}")


def agent_argv(node: runtime.Node) -> list[str]:
    return ["memsnap", "agent", "--listen", f"{node.address}:{PORT}", "--node-name", node.name,
            "--tls-cert", str(NODE_FILES.cert), "--tls-key", str(NODE_FILES.key), "--tls-ca", str(NODE_FILES.ca)]


def _launch(node: runtime.Node) -> None:
    # Detached, stdio from inside the node: nothing of the host's stays open in the agent.
    script = f'setsid "$@" </dev/null >>{LOG} 2>&1 &'
    proc = runtime.run(node.name, ["sh", "-c", script, "sh", *agent_argv(node)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise runtime.NodeError(f"cannot start the agent in {node.name}: {proc.stderr.strip()}")


async def _wait_answering(nodes: Sequence[runtime.Node], timeout: float) -> None:
    files = pki.client_files(HOST_IDENTITY)
    await asyncio.gather(*(_wait_one(node, files, timeout) for node in nodes))


async def _wait_one(node: runtime.Node, files: pki.TlsFiles, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with AgentClient(node.name, files=files, address=node.address, timeout=5) as agent:
        while True:
            try:
                await agent.get_json("/healthz")
                return
            except AgentError as exc:
                if time.monotonic() > deadline:
                    raise runtime.NodeError(f"the agent in {node.name} did not answer /healthz in {timeout:.0f}s "
                                            f"({exc}); its log: {_log_tail(node)}") from None
            await asyncio.sleep(0.2)


def _log_tail(node: runtime.Node) -> str:
    proc = runtime.run(node.name, ["tail", "-n", "3", LOG], capture_output=True, text=True)
    return " | ".join(proc.stdout.strip().splitlines()) or "(empty)"


def stop(node: runtime.Node, timeout: float = 15.0) -> bool:
    """End the node's own agent (SIGTERM: it leaves its targets clean), for a node whose agent runs
    as the chart's DaemonSet instead (same address and port); False if none ran."""
    pid = _agent_pid(node)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _agent_pid(node) == pid:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += timeout
        time.sleep(0.1)
    return True


def _agent_pid(node: runtime.Node) -> int | None:
    """Host pid of the agent agent_argv(node) started in the node, if it runs."""
    want = agent_argv(node)[1:]
    for pid in cgroups.pids(node.name):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if argv[-len(want):] == want and state != "Z":
            return pid
    return None
