"""Local nodes for these tests: node-1 and node-2 up for the session (see memsnap.nodes.testing)."""
import pytest

from memsnap.nodes.testing import local_nodes, nodes_cli  # noqa: F401


@pytest.fixture(scope="session")
def cli(nodes_cli):
    return nodes_cli
