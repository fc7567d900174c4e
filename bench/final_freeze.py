"""Benchmark 6 (in a local node): how long a final checkpoint freezes the workload, by memory size.

For 256 MiB, 1 GiB and 4 GiB workloads dirtying 1 % of their memory per second, and again all
dirtying the same 10 MiB/s: memsnap's `checkpoint --final` one second after the second of two
pre-copy layers (CRIU with --track-mem-uffd writes only the delta) against a plain `criu dump`
of a twin workload (which freezes it for all of its run). The twin runs after the first one
has ended, so the two never share memory or CPU.
"""
from __future__ import annotations

import time

from .checkpoint_cost import BASE, criu_dump, memsnap, sh, start
from .common import MIB, table

SIZES_MIB = (256, 1024, 4096)


def run(sizes: tuple[int, ...] = SIZES_MIB, fixed_rate: bool = False) -> str:
    """fixed_rate: every size dirties 10 MiB/s (2560 pages/s) instead of 1 % of itself."""
    from memsnap import nodes
    nodes.up(count=1)
    rows = []
    try:
        for mib in sizes:
            rate = 10 * MIB // 4096 if fixed_rate else mib * MIB // 4096 // 100
            rows.append(_one_size(mib, rate))
    finally:
        sh(f"rm -rf {BASE}; pkill -f '[w]orkload.py' || true; memsnap untrack || true")
    return table(["memory", "dirtied/s", "memsnap freeze s", "phases (s)", "final layer MiB", "criu dump s",
                  "criu dump MiB", "freeze / criu dump"], rows)


def _one_size(mib: int, rate: int) -> list[str]:
    d = f"{BASE}/f{mib}"
    pid = start(mib, rate, f"f{mib}")
    memsnap("checkpoint", "--pid", str(pid), "--dir", f"{d}/l1")
    time.sleep(1.0)
    memsnap("checkpoint", "--pid", str(pid), "--dir", f"{d}/l2", "--parent", f"{d}/l1")
    time.sleep(1.0)
    fin = memsnap("checkpoint", "--pid", str(pid), "--dir", f"{d}/final", "--parent", f"{d}/l2", "--final")
    sh(f"rm -rf {d}")
    twin = start(mib, rate, f"f{mib}p")
    time.sleep(1.0)
    criu_s, criu_bytes = criu_dump(twin, f"{d}/criu", leave_running=False)
    sh(f"rm -rf {d}")
    order = ["freeze", "collect", "criu state dump", "memory delta"]
    phases = ", ".join(f"{k} {fin['phases'][k]:.3f}" for k in order if k in fin["phases"])
    return [f"{mib} MiB", f"{rate * 4096 / MIB:.1f} MiB", f"{fin['freeze_seconds']:.3f}", phases, f"{fin['bytes'] / MIB:.1f}",
            f"{criu_s:.3f}", f"{criu_bytes / MIB:.0f}", f"{fin['freeze_seconds'] / criu_s:.3f}x"]
