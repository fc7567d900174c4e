"""The union of the last N rounds' dirty pages, kept cheaply as rounds come and go.

Re-unioning N rounds every cycle costs N times the pages of a round; with two stacks (newer
rounds with their running union, older ones with suffix unions) each round takes part in a
constant number of unions, so a cycle costs about one union of the window's size.
"""
from __future__ import annotations

from ..tracking import PageRanges


class WindowUnion:
    def __init__(self, rounds: int):
        self.rounds = rounds
        self._older: list[PageRanges] = []  # [-1] is the union of every older round
        self._newer: list[PageRanges] = []
        self._newer_union = PageRanges()

    def __len__(self) -> int:
        return len(self._older) + len(self._newer)

    def push(self, dirty: PageRanges) -> None:
        self._newer.append(dirty)
        self._newer_union = self._newer_union.union(dirty)
        if len(self) > self.rounds:
            self._drop_oldest()

    def union(self) -> PageRanges:
        return self._older[-1].union(self._newer_union) if self._older else self._newer_union

    def _drop_oldest(self) -> None:
        if not self._older:  # move the newer rounds over, newest first, as suffix unions
            acc = PageRanges()
            for dirty in reversed(self._newer):
                acc = acc.union(dirty)
                self._older.append(acc)
            self._newer, self._newer_union = [], PageRanges()
        self._older.pop()
