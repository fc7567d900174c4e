"""A workload for migration tests and benchmarks: memory whose every byte follows from a
counter, a tick every millisecond, and a self-check. Standard library only.

    python3 -m memsnap.ticker [--mib N] [--rate PAGES_PER_S] [--report FILE]

Page i holds (i, version[i]) in its first 16 bytes and a filler made from i; each tick writes
the pages due at RATE pages/s (bumping their version). Held up (a pre-copy round competing for
the CPU, the pause), it makes up for at most MAX_BEHIND seconds: it goes on at its rate rather
than writing a burst of what a long stall left due. On SIGUSR1 it checks every page against
what it must hold and writes one JSON line to FILE (atomically): ok, bad_pages, writes, the
longest gap between two ticks (the pause the workload felt, by the wall clock: CRIU
restores a PID namespace's monotonic clock as it was at the dump, hiding the pause), its
hostname and pid. SIGUSR2 resets the longest gap. A migration that lost one write shows up as
a bad page. With --timeline FILE it also keeps the wall-clock time and write count of its
last 120000 ticks (~2 min) and writes them to FILE (JSON) before each report: what a
migration's background fill costs it, tick by tick.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import socket
import struct
import time
from array import array

PAGE = mmap.PAGESIZE
HEADER = struct.Struct("<QQ")
MAX_BEHIND = 0.1  # seconds of writes a held-up ticker makes up for


def filler(i: int) -> bytes:
    return (i * 0x9E3779B97F4A7C15 & (1 << 64) - 1).to_bytes(8, "little") * ((PAGE - HEADER.size) // 8)


class Memory:
    def __init__(self, mib: int):
        self.pages = (mib << 20) // PAGE
        self.mem = mmap.mmap(-1, self.pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.version = [0] * self.pages
        for i in range(self.pages):
            self.mem[i * PAGE:(i + 1) * PAGE] = HEADER.pack(i, 0) + filler(i)
        self.cursor = 0
        self.writes = 0

    def write_next(self) -> None:
        i = (self.cursor * 7919) % self.pages  # 7919 is prime: every page in turn, scattered
        self.cursor += 1
        self.version[i] += 1
        self.mem[i * PAGE:i * PAGE + HEADER.size] = HEADER.pack(i, self.version[i])
        self.writes += 1

    def bad_pages(self) -> int:
        bad = 0
        for i in range(self.pages):
            page = self.mem[i * PAGE:(i + 1) * PAGE]
            if page[:HEADER.size] != HEADER.pack(i, self.version[i]) or page[HEADER.size:] != filler(i):
                bad += 1
        return bad


def main() -> None:
    p = argparse.ArgumentParser(prog="memsnap.ticker")
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--rate", type=float, default=100.0,
                   help="pages written per second (0: as fast as it can, ~0.9 ms of writing per tick)")
    p.add_argument("--cost-us", type=float, default=0.0,
                   help="with --rate 0: CPU time spent per page written (a workload that computes between writes)")
    p.add_argument("--report", default="/tmp/ticker.json")
    p.add_argument("--timeline", default="", help="write the last ticks' times and write counts here on SIGUSR1")
    args = p.parse_args()
    memory = Memory(args.mib)
    timeline = Timeline() if args.timeline else None
    wanted = {"check": False, "reset": False}
    signal.signal(signal.SIGUSR1, lambda *_: wanted.__setitem__("check", True))
    signal.signal(signal.SIGUSR2, lambda *_: wanted.__setitem__("reset", True))
    _report(args.report, {"ready": True, "pages": memory.pages})
    last = time.time()
    longest, owed = 0.0, 0.0
    while True:
        time.sleep(0.001)
        now = time.time()
        elapsed, last = now - last, now
        longest = max(longest, elapsed)
        if timeline is not None:
            timeline.add(now, memory.writes)
        if args.rate > 0:
            owed = min(owed + elapsed * args.rate, args.rate * MAX_BEHIND + 1)
            while owed >= 1:
                memory.write_next()
                owed -= 1
        else:  # CPU-bound: what it dirties is what the CPU it gets allows (auto-converge's case)
            while time.time() - now < 0.0009:
                memory.write_next()
                _spin(args.cost_us / 1e6)
        if wanted["reset"]:
            wanted["reset"], longest = False, 0.0
        if wanted["check"]:
            wanted["check"] = False
            bad = memory.bad_pages()
            if timeline is not None:
                timeline.save(args.timeline)
            _report(args.report, {"ok": bad == 0, "bad_pages": bad, "writes": memory.writes,
                                  "pages": memory.pages, "longest_gap_ms": round(longest * 1000, 2),
                                  "host": socket.gethostname(), "pid": os.getpid()})
            last = time.time()  # the check itself is not a pause


class Timeline:
    """A ring of (wall-clock time, writes so far) per tick, in flat arrays (no object per tick)."""

    def __init__(self, ticks: int = 120_000):
        self.times, self.writes, self.next = array("d", bytes(8 * ticks)), array("q", bytes(8 * ticks)), 0

    def add(self, now: float, writes: int) -> None:
        i = self.next % len(self.times)
        self.times[i], self.writes[i] = now, writes
        self.next += 1

    def save(self, path: str) -> None:
        n = len(self.times)
        order = [i % n for i in range(max(0, self.next - n), self.next)]
        _report(path, {"times": [round(self.times[i], 6) for i in order], "writes": [self.writes[i] for i in order]})


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _report(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(data) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
