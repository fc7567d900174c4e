"""Benchmark 1: one read-and-rearm per GiB tracked, against finding changes by hashing pages.

For each size, the workload populates its region, writes 1 % of its pages, and then both
methods find what changed: memsnap's round (PAGEMAP_SCAN) and a userspace baseline that reads
all memory through /proc/PID/mem and compares a CRC per page with the previous pass.
"""
from __future__ import annotations

import os
import time
import zlib

from memsnap.tracking import open_session

from .common import MIB, Workload, table

CHUNK = 8 * MIB


def page_crcs(pid: int, base: int, size: int, page: int) -> list[int]:
    crcs = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for off in range(0, size, CHUNK):
            data = os.pread(mem.fileno(), min(CHUNK, size - off), base + off)
            view = memoryview(data)
            crcs += [zlib.crc32(view[i:i + page]) for i in range(0, len(data), page)]
    return crcs


def measure(mib: int) -> list:
    with Workload(mib) as w:
        w.send(f"write 0 {w.pages}")
        with open_session(w.pid) as session:
            session.start()
            before = page_crcs(w.pid, w.base, w.size, w.page)
            stride = 100
            w.send(f"write 0 {w.pages // stride} {stride}")
            t = time.perf_counter()
            r = session.round()
            scan = time.perf_counter() - t
            t = time.perf_counter()
            after = page_crcs(w.pid, w.base, w.size, w.page)
            changed = sum(1 for a, b in zip(before, after) if a != b)
            hashing = time.perf_counter() - t
        gib = w.size / (1 << 30)
        found = r.dirty_pages
        return [f"{mib}", f"{scan * 1000:.2f}", f"{scan / gib * 1000:.2f}", f"{hashing * 1000:.0f}",
                f"{hashing / gib * 1000:.0f}", f"{hashing / scan:.0f}x", f"{w.pages // stride}", found, changed]


def run(max_mib: int = 4096) -> str:
    sizes = [s for s in (64, 256, 1024, 4096) if s <= max_mib]
    rows = [measure(mib) for mib in sizes]
    return "* scan found: the whole process (the interpreter dirties ~80 pages of its own)\n" + table(["MiB", "scan ms", "scan ms/GiB", "hash ms", "hash ms/GiB", "hash/scan",
                  "written", "scan found*", "hash found"], rows)
