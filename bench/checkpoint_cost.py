"""Benchmark 4 (in a local node): incremental layers against full CRIU dumps.

Two identical 1 GiB workloads dirty 1 % and 10 % of their memory per second. memsnap keeps a
chain of one of them (a process memsnap tracks holds its userfaultfd, which CRIU itself
cannot dump); the other gets plain CRIU at the same moments: the size and time of an
incremental layer taken one second after the previous one against a full `criu dump
--leave-running`, then the freeze time of memsnap's final checkpoint against a plain
`criu dump` (which freezes the workload for all of its run). memsnap's chain goes first.
"""
from __future__ import annotations

import json
import time

from memsnap import nodes

from .common import MIB, table

NODE = "node-1"
WORKLOAD = "/opt/memsnap/node-agent/memsnap/workload.py"
BASE = "/var/lib/memsnap-bench"


def sh(command: str) -> str:
    result = nodes.run(NODE, ["sh", "-c", command], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{command}: {result.stderr.strip()}")
    return result.stdout.strip()


def start(mib: int, rate: int, tag: str) -> int:
    pid = int(sh(f"setsid python3 {WORKLOAD} --mib {mib} --churn {rate} </dev/null >/tmp/{tag}.json 2>&1 & echo $!"))
    while not sh(f"cat /tmp/{tag}.json"):
        time.sleep(0.1)
    time.sleep(1.0)  # populated, churning
    return pid


def memsnap(*args: str) -> dict:
    sh("sync")
    return json.loads(sh("memsnap " + " ".join(args)))


def criu_dump(pid: int, directory: str, leave_running: bool) -> tuple[float, int]:
    sh("sync")  # start each timed dump without a backlog of earlier dumps' writeback
    began = time.monotonic()
    sh(f"mkdir -p {directory} && criu dump -t {pid} -D {directory} -o dump.log "
       + ("--leave-running" if leave_running else "")
       + f" || {{ grep Error {directory}/dump.log | tail -3 >&2; exit 1; }}")
    seconds = time.monotonic() - began
    return seconds, int(sh(f"du -sb {directory} | cut -f1"))


def run(mib: int = 1024) -> str:
    nodes.up(count=1)
    rows, freeze_rows = [], []
    pages = mib * MIB // 4096
    try:
        for percent in (1, 10):
            tag = f"b{percent}"
            rate = pages * percent // 100
            pid = start(mib, rate, tag)
            plain_pid = start(mib, rate, tag + "p")
            d = f"{BASE}/{tag}"
            # memsnap's chain of one workload first, then plain CRIU on its twin: a dump right
            # after a --leave-running dump of another process was seen to run 3-4x slower here.
            full = memsnap("checkpoint", "--pid", str(pid), "--dir", f"{d}/l1")
            time.sleep(1.0)
            inc = memsnap("checkpoint", "--pid", str(pid), "--dir", f"{d}/l2", "--parent", f"{d}/l1")
            time.sleep(1.0)
            fin = memsnap("checkpoint", "--pid", str(pid), "--dir", f"{d}/final", "--parent", f"{d}/l2", "--final")
            criu_s, criu_bytes = criu_dump(plain_pid, f"{d}/criu-full", leave_running=True)
            time.sleep(1.0)
            plain_s, _ = criu_dump(plain_pid, f"{d}/criu-plain", leave_running=False)
            rows.append([f"{percent} %/s", f"{full['bytes'] / MIB:.0f}", f"{inc['bytes'] / MIB:.1f}",
                         f"{inc['seconds']:.2f}", f"{criu_bytes / MIB:.0f}", f"{criu_s:.2f}",
                         f"{criu_bytes / max(inc['bytes'], 1):.0f}x"])
            phases = " ".join(f"{k} {v:.3f}" for k, v in fin["phases"].items())
            freeze_rows.append([f"{percent} %/s", f"{fin['freeze_seconds']:.3f} ({phases})", f"{fin['bytes'] / MIB:.1f}",
                                f"{plain_s:.3f}", f"{plain_s / fin['freeze_seconds']:.2f}x"])
    finally:
        sh(f"rm -rf {BASE}; pkill -f '[w]orkload.py' || true; memsnap untrack || true")
    return (table(["dirty rate", "full layer MiB", "incr. layer MiB", "incr. s", "criu dump MiB",
                   "criu dump s", "criu/incr. size"], rows)
            + "\n\nfinal checkpoint freeze vs plain criu dump (the workload stands still throughout)\n"
            + table(["dirty rate", "memsnap freeze s", "final layer MiB", "criu dump s", "ratio"], freeze_rows))
