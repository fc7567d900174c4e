"""Sets of pages as sorted, disjoint, coalesced [start, end) address ranges."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..kernel.pagemap import PAGE_SIZE


class PageRanges:
    """An immutable-by-convention set of page-aligned address ranges."""

    __slots__ = ("_ranges",)

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        self._ranges = _coalesce(sorted(r for r in ranges if r[0] < r[1]))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PageRanges) and self._ranges == other._ranges

    def __repr__(self) -> str:
        shown = ", ".join(f"{s:#x}-{e:#x}" for s, e in self._ranges[:4])
        more = f", … {len(self._ranges) - 4} more" if len(self._ranges) > 4 else ""
        return f"PageRanges([{shown}{more}], pages={self.pages})"

    @property
    def bytes(self) -> int:
        return sum(e - s for s, e in self._ranges)

    @property
    def pages(self) -> int:
        return self.bytes // PAGE_SIZE

    def addresses(self) -> Iterator[int]:
        """Every page address, in order."""
        for start, end in self._ranges:
            yield from range(start, end, PAGE_SIZE)

    def union(self, *others: PageRanges) -> PageRanges:
        return PageRanges([r for ranges in (self, *others) for r in ranges])

    def intersection(self, other: PageRanges) -> PageRanges:
        out, a, b = [], self._ranges, other._ranges
        i = j = 0
        while i < len(a) and j < len(b):
            start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if start < end:
                out.append((start, end))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return PageRanges(out)

    def difference(self, other: PageRanges) -> PageRanges:
        out = []
        for start, end in self._ranges:
            for o_start, o_end in other._ranges:
                if o_end <= start or o_start >= end:
                    continue
                if o_start > start:
                    out.append((start, o_start))
                start = max(start, o_end)
                if start >= end:
                    break
            if start < end:
                out.append((start, end))
        return PageRanges(out)

    def covers(self, start: int, end: int) -> bool:
        return not PageRanges([(start, end)]).difference(self)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
