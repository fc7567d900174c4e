"""Local nodes for the tests: one session brings node-1 and node-2 up (building the image when the
cache is cold, as on a fresh CI machine) and takes them down at the end, unless they were
already running before the session."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memsnap import nodes


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`memsnap nodes ARGS...` in a subprocess (the same code path as the memsnap entry point)."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, "-m", "memsnap.commands.nodes", *args], **kwargs)


@pytest.fixture(scope="session", name="cli")
def cli_fixture():
    """The `memsnap nodes` runner, for tests: cli("exec", "node-1", "--", "true")."""
    return cli


@pytest.fixture(scope="session")
def local_nodes() -> list[nodes.Node]:
    if os.geteuid() != 0:
        pytest.skip("local nodes need root")
    were_up = {n.name for n in nodes.list_nodes() if n.running}
    # The first build (debootstrap, ~1 min here) happens here when the cache is cold.
    proc = cli("up", "--count", "2", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    yield [nodes.get("node-1"), nodes.get("node-2")]
    if not {"node-1", "node-2"} <= were_up:
        assert cli("down").returncode == 0
