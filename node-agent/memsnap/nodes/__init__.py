"""Local nodes: memsnap on one machine without a cluster (used by the tests and the demo).

Python API (all need root)::

    from memsnap import nodes
    nodes.up(count=2)                      # node-1, node-2 (builds the image on first use)
    nodes.get("node-1").address            # "198.18.0.11"; node-N is 198.18.0.(10+N)/15
    nodes.run("node-1", ["criu", "check"], capture_output=True, text=True)   # like subprocess.run
    nodes.popen("node-2", ["python3", "-m", "http.server"])                  # like subprocess.Popen
    nodes.copy_in("/host/file", "node-1", "/root/")
    nodes.down()

The host reaches the nodes through the bridge memsnap0 (198.18.0.1); nodes resolve each other's
names (node-1, ...) and the host's ("host") through /etc/hosts.
"""
from memsnap.nodes.net import BRIDGE, BRIDGE_ADDRESS, node_address
from memsnap.nodes.runtime import (
    BadNodeRequest,
    Node,
    NodeError,
    NodeNotRunning,
    command,
    copy_in,
    down,
    get,
    list_nodes,
    node_env,
    popen,
    run,
    up,
)

__all__ = [
    "BadNodeRequest", "BRIDGE", "BRIDGE_ADDRESS", "Node", "NodeError", "NodeNotRunning", "command", "copy_in", "down",
    "get", "list_nodes", "node_address", "node_env", "popen", "run", "up",
]
