"""Benchmark 2: how much tracking slows a memory-writing workload.

The workload writes one byte per page round a 256 MiB region as fast as it can (a worst
case: every page is re-dirtied each pass, so every round re-arms and re-faults all of them),
untracked, then tracked at 1 s and 0.1 s rounds. Same process, same run, interleaved.
"""
from __future__ import annotations

import threading

from memsnap.tracking import open_session

from .common import Workload, table

SECONDS = 3.0


def _tracked(w: Workload, interval: float) -> tuple[int, int]:
    stop = threading.Event()
    rounds = []
    with open_session(w.pid) as session:
        session.start()

        def loop():
            while not stop.wait(interval):
                rounds.append(session.round())
        t = threading.Thread(target=loop)
        t.start()
        try:
            pages = int(w.send(f"bench {SECONDS}"))
        finally:
            stop.set()
            t.join()
    return pages, len(rounds)


def run(repeats: int = 2) -> str:
    results: dict[str, list[int]] = {"untracked": [], "1 s": [], "0.1 s": []}
    with Workload(256) as w:
        w.send(f"write 0 {w.pages}")
        for _ in range(repeats):
            results["untracked"].append(int(w.send(f"bench {SECONDS}")))
            results["1 s"].append(_tracked(w, 1.0)[0])
            results["0.1 s"].append(_tracked(w, 0.1)[0])
    base = sum(results["untracked"]) / repeats
    rows = []
    for name, runs in results.items():
        rate = sum(runs) / repeats / SECONDS
        rows.append([name, f"{rate / 1e6:.2f}", f"{rate / (base / SECONDS):.3f}"])
    return table(["tracking", "M page-writes/s", "vs untracked"], rows)
