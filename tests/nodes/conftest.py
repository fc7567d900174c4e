"""Local nodes for these tests: node-1 and node-2 up for the session (see memsnap.nodes.testing)."""
import pytest

from memsnap.nodes.testing import local_nodes, run_cli  # noqa: F401  (local_nodes is a fixture)


@pytest.fixture(scope="session")
def cli():
    """`memsnap nodes ARGS...` as a subprocess: cli("exec", "node-1", "--", "true")."""
    return run_cli
