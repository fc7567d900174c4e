"""Benchmark 3: reported against true dirty pages for known write patterns (in the region)."""
from __future__ import annotations

from memsnap.tracking import open_session

from .common import Workload, table

PATTERNS = {
    "sequential 1000": "write 0 1000",
    "stride 7 x 2000": "write 3 2000 7",
    "threads 4 x 1000": "threads 100 4000 4",
    "kernel read() 200": "readinto 9000 200",
}


def run() -> str:
    rows = []
    with Workload(64) as w:
        region = range(w.base, w.base + w.size)
        with open_session(w.pid) as session:
            session.start()
            for name, command in PATTERNS.items():
                session.round()
                w.send(command)
                words = command.split()
                first, count = int(words[1]), int(words[2])
                stride = int(words[3]) if words[0] == "write" and len(words) > 3 else 1
                truth = {w.base + (first + i * stride) * w.page for i in range(count)}
                r = session.round()
                got = {a for s in r.samples if s.pid == w.pid for a in s.dirty.addresses() if a in region}
                rows.append([name, len(truth), len(got), len(truth - got), len(got - truth)])
    return table(["pattern", "true", "reported", "missed", "extra"], rows)
