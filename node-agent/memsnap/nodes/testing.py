"""pytest fixtures for tests that need local nodes.

tests/nodes/conftest.py imports them; any conftest can do the same::

    from memsnap.nodes.testing import local_nodes, nodes_cli  # noqa: F401
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator

import pytest

from memsnap.nodes import runtime

COUNT = 2


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`memsnap nodes ARGS...` in a subprocess (the code path of the memsnap entry point)."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, "-m", "memsnap.commands.nodes", *args], **kwargs)


@pytest.fixture(scope="session")
def nodes_cli():
    """The `memsnap nodes` runner: nodes_cli("exec", "node-1", "--", "true")."""
    return run_cli


@pytest.fixture(scope="session")
def local_nodes() -> Iterator[list[runtime.Node]]:
    """node-1 and node-2, running for the whole session.

    The first use builds the node image if the cache is cold (a fresh CI machine: ~1 min here).
    At the end the nodes go down again, unless they were already running before the session.
    """
    if os.geteuid() != 0:
        pytest.skip("local nodes need root")
    were_up = {n.name for n in runtime.list_nodes() if n.running}
    proc = run_cli("up", "--count", str(COUNT), timeout=1800)
    assert proc.returncode == 0, f"memsnap nodes up failed:\n{proc.stderr}"
    yield [runtime.get(runtime.node_name(i)) for i in range(1, COUNT + 1)]
    if not {runtime.node_name(i) for i in range(1, COUNT + 1)} <= were_up:
        proc = run_cli("down")
        assert proc.returncode == 0, proc.stderr
