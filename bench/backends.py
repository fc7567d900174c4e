"""Benchmark 5: the three backends side by side (run it where all exist: in the memsnap kernel,
`kernel/vm-run -- python -m bench --only backends`).

Per-write overhead: the time to write N pages right after a round (each first write takes a
fault under uffd-wp and tracepoint; soft-dirty faults after clear_refs too), minus the same
writes untracked. Per-round cost: one round over a 64 MiB region with 1 % of it written.
"""
from __future__ import annotations

import time

from memsnap.tracking import open_session
from memsnap.tracking.registry import explain

from .common import Workload, table

WRITES = 4096
REPEATS = 5


def _timed_write(w: Workload, first: int) -> float:
    began = time.perf_counter()
    w.send(f"write {first} {WRITES}")
    return time.perf_counter() - began


def _measure(backend: str | None) -> tuple[float, float]:
    """(seconds per first write, seconds per round) for one backend; None: untracked."""
    with Workload(64) as w:
        w.send(f"write 0 {w.pages}")
        if backend is None:
            writes = [_timed_write(w, 0) for _ in range(REPEATS)]
            return min(writes) / WRITES, 0.0
        with open_session(w.pid, backend) as session:
            session.start()
            writes, rounds = [], []
            for _ in range(REPEATS):
                session.round()
                writes.append(_timed_write(w, 0))
                session.round()  # the round below sees only the 1 %
                w.send(f"write 0 {w.pages // 100} 100")
                began = time.perf_counter()
                session.round()
                rounds.append(time.perf_counter() - began)
            return min(writes) / WRITES, min(rounds)


def run() -> str:
    base_write, _ = _measure(None)
    rows = []
    for name, avail in explain().items():
        if not avail.ok:
            rows.append([name, "unavailable", "", "", avail.reason[:60]])
            continue
        per_write, per_round = _measure(name)
        rows.append([name, f"{(per_write - base_write) * 1e6:.2f}", f"{per_write / base_write:.2f}x",
                     f"{per_round * 1000:.2f}", ""])
    return table(["backend", "µs added per first write", "write time vs untracked",
                  "ms per round (64 MiB, 1 %)", "note"], rows)
