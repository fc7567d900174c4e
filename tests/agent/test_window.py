"""The working-set window equals the plain union of the last N rounds, whatever the order of
pushes (checked against the obvious computation over random rounds)."""
from __future__ import annotations

import random

import pytest

from memsnap.agent.window import WindowUnion
from memsnap.tracking import PageRanges

PAGE = 4096


def random_round(rng: random.Random) -> PageRanges:
    starts = rng.sample(range(0, 2000), rng.randrange(0, 30))
    return PageRanges((s * PAGE, (s + rng.randrange(1, 20)) * PAGE) for s in starts)


@pytest.mark.parametrize("size", [1, 2, 5, 12])
def test_matches_the_union_of_the_last_rounds(size):
    rng = random.Random(size)
    window, history = WindowUnion(size), []
    for _ in range(100):
        dirty = random_round(rng)
        window.push(dirty)
        history.append(dirty)
        expected = PageRanges().union(*history[-size:])
        assert window.union() == expected
        assert len(window) == min(len(history), size)
