"""The nodes' network: one host bridge, one veth per node, addresses in 198.18.0.0/15.

The bridge has no uplink and the nodes no default route, and we never enable forwarding or
NAT, so nothing leaves the machine. The host itself holds BRIDGE_ADDRESS on the bridge, which
lets host-side tools (tests, the demo) talk to node agents directly.
"""
from __future__ import annotations

import subprocess

BRIDGE = "memsnap0"
PREFIX = 15
BRIDGE_ADDRESS = "198.18.0.1"
MAX_NODES = 200


def node_address(index: int) -> str:
    """Address of node-<index> (1-based): 198.18.0.11, .12, ..."""
    if not 1 <= index <= MAX_NODES:
        raise ValueError(f"node index {index} outside 1..{MAX_NODES}")
    return f"198.18.0.{10 + index}"


def host_veth(name: str) -> str:
    return f"ms-{name}"[:15]  # IFNAMSIZ


def _ip(*args: str, netns_pid: int | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *args]
    if netns_pid is not None:
        cmd = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--", *cmd]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def link_exists(dev: str) -> bool:
    return _ip("link", "show", "dev", dev, check=False).returncode == 0


def ensure_bridge() -> None:
    if link_exists(BRIDGE):
        return
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{BRIDGE_ADDRESS}/{PREFIX}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def remove_bridge() -> None:
    if link_exists(BRIDGE):
        _ip("link", "del", BRIDGE)


def attach(name: str, index: int, init_pid: int) -> str:
    """Give the node (whose init is init_pid) eth0 on the bridge and its address; returns the address."""
    veth = host_veth(name)
    if link_exists(veth):  # left from a node that died uncleanly
        _ip("link", "del", veth)
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(init_pid))
    _ip("link", "set", veth, "master", BRIDGE, "up")
    address = node_address(index)
    _ip("link", "set", "lo", "up", netns_pid=init_pid)
    _ip("addr", "add", f"{address}/{PREFIX}", "dev", "eth0", netns_pid=init_pid)
    _ip("link", "set", "eth0", "up", netns_pid=init_pid)
    return address


def detach(name: str) -> None:
    """Remove the host end (it also vanishes by itself when the node's netns dies)."""
    veth = host_veth(name)
    if link_exists(veth):
        _ip("link", "del", veth, check=False)
