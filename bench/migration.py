"""Benchmark 7 (two local nodes): live migration with `memsnap migrate`.

- The pause the workload itself feels (the longest gap between two of its 1 ms ticks, by the
  wall clock) for a 1 GiB workload dirtying ~1 % of its memory per second: memsnap's pre-copy
  against stop-and-copy (freeze, dump everything, copy, restore) over the same agents and TLS.
- A full layer's throughput between the agents (TLS) against raw TCP between the same nodes.
- Links shaped with tc (tbf: 1 Gbit/s and 10 Gbit/s): total time and pause, both modes.
- A workload that dirties faster than the link carries: without --auto-converge it fails at
  the progress timeout; with it, it converges at some throttle.
"""
from __future__ import annotations

import json
import time
import uuid

from memsnap import nodes

from .common import MIB, table

SRC, DST = "node-1", "node-2"
RAW_TCP = """
import socket, sys, time
role, host, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "recv":
    s = socket.create_server((host, 9700)); c, _ = s.accept(); got = 0
    while (n := len(c.recv(1 << 20))): got += n
    print(got)
else:
    c = socket.create_connection((host, 9700)); buf = bytes(1 << 20); t = time.monotonic()
    for _ in range(size >> 20): c.sendall(buf)
    c.shutdown(socket.SHUT_WR); c.recv(1); print(size / (time.monotonic() - t))
"""


def sh(node: str, command: str, timeout: float = 900) -> str:
    result = nodes.run(node, ["sh", "-c", command], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{node}: {command}: {result.stderr.strip()}")
    return result.stdout.strip()


class Ticker:
    def __init__(self, mib: int, rate: float, cost_us: float = 0.0):
        self.name, self.node = f"b-{uuid.uuid4().hex[:6]}", SRC
        self.report = f"/tmp/{self.name}.json"
        self.pid = int(sh(SRC, f"memsnap containers run --name {self.name} -- python3 -m memsnap.ticker "
                               f"--mib {mib} --rate {rate} --cost-us {cost_us} --report {self.report}"))
        self._wait()
        time.sleep(1.0)

    def _wait(self) -> dict:
        while True:
            out = sh(self.node, f"cat {self.report} 2>/dev/null || true")
            if out:
                return json.loads(out)
            time.sleep(0.1)

    def reset_gap(self) -> None:
        sh(self.node, f"kill -USR2 {self.pid}")
        time.sleep(0.05)

    def check(self) -> dict:
        sh(self.node, f"rm -f {self.report}; kill -USR1 {self.pid}")
        return self._wait()

    def migrate(self, *args: str) -> dict:
        to = DST if self.node == SRC else SRC
        self.reset_gap()
        out = nodes.run(self.node, ["memsnap", "migrate", "--pid", str(self.pid), "--to", to, "--json", *args],
                        capture_output=True, text=True, timeout=900)
        events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        last = events[-1] if events else {"event": "error", "error": out.stderr.strip()}
        if last["event"] == "done":
            self.node, self.pid = to, last["target_pid"]
            report = self.check()
            if not report["ok"]:
                raise RuntimeError(f"memory differs after the migration: {report}")
            last["felt_ms"] = report["longest_gap_ms"]
        last["rounds"] = [e for e in events if e["event"] == "round"]
        return last

    def stop(self) -> None:
        sh(self.node, f"memsnap containers stop {self.name}")


def _row(label: str, r: dict) -> list:
    if r["event"] != "done":
        return [label, "failed", "-", "-", "-", "-", r["error"][:60]]
    return [label, f"{r['felt_ms']:.0f}", f"{r['downtime_ms']:.0f}", f"{r['total_seconds']:.1f}",
            r["iterations"], f"{r['transferred_bytes'] / MIB:.0f}", r.get("converged_because", "")[:60]]


HEAD = ["run", "pause felt ms", "pause ms (agent)", "total s", "rounds", "sent MiB", "why it stopped"]


def pause_vs_stop_and_copy(mib: int = 1024) -> tuple[str, dict]:
    t = Ticker(mib, rate=mib * MIB / 4096 / 100)  # ~1 % of the pages per second
    try:
        pre = t.migrate()
        stop = t.migrate("--stop-and-copy")
    finally:
        t.stop()
    ratio = stop["felt_ms"] / pre["felt_ms"] if pre.get("felt_ms") else float("nan")
    text = table(HEAD, [_row(f"memsnap pre-copy, {mib} MiB", pre), _row(f"stop-and-copy, {mib} MiB", stop)])
    return text + f"\n\nstop-and-copy / memsnap pause: {ratio:.1f}x", pre


def throughput(pre: dict, mib: int = 1024) -> str:
    first = pre["rounds"][0]
    sh(DST, "pkill -f '[r]ecv 198' || true")
    recv = nodes.popen(DST, ["python3", "-c", RAW_TCP, "recv", nodes.get(DST).address, str(mib << 20)])
    time.sleep(0.5)
    raw = float(sh(SRC, f"python3 -c '{RAW_TCP}' send {nodes.get(DST).address} {mib << 20}"))
    recv.wait(60)
    ratio = first["bandwidth"] / raw
    return table(["path", "MiB/s"], [["raw TCP, node-1 -> node-2", f"{raw / MIB:.0f}"],
                                     ["memsnap full layer (TLS, sha256 on the target)", f"{first['bandwidth'] / MIB:.0f}"]]) \
        + f"\n\nmemsnap / raw TCP: {ratio:.2f} (goal >= 0.80)"


def shaped_links(mib: int = 1024) -> str:
    rows = []
    for rate in ("1gbit", "10gbit"):
        for node in (SRC, DST):  # both directions: the hand-over's replies cross it too
            sh(node, f"tc qdisc replace dev eth0 root tbf rate {rate} burst 1mb latency 50ms")
        try:
            t = Ticker(mib, rate=mib * MIB / 4096 / 100)
            try:
                pre, stop = t.migrate(), t.migrate("--stop-and-copy")
            finally:
                t.stop()
            rows += [_row(f"{rate}, pre-copy", pre), _row(f"{rate}, stop-and-copy", stop)]
        finally:
            for node in (SRC, DST):
                sh(node, "tc qdisc del dev eth0 root || true")
    return table(HEAD, rows) + ("\n\n(RTT is the veth's own, ~0.05 ms: this kernel has no netem "
                                "(CONFIG_NET_SCH_NETEM off), so 0.5 ms RTT cannot be emulated here)")


def auto_converge(mib: int = 64) -> str:
    rows = []
    for flags in ([], ["--auto-converge"]):
        # CPU-bound, 40 µs of work per page written: ~25000 pages/s (~95 MiB/s) on a whole core,
        # so what it dirties follows the CPU share the throttle leaves it.
        t = Ticker(mib, rate=0, cost_us=40)
        try:
            r = t.migrate("--bandwidth", "24", "--progress-timeout", "10", "--max-downtime-ms", "300",
                          "--completion-timeout-per-gib", "3000", *flags)
        finally:
            t.stop()
        row = _row("auto-converge" if flags else "no auto-converge", r)
        reached = r.get("throttle_percent", max((x.get("throttle_percent", 0) for x in r["rounds"]), default=0))
        row.append(f"{reached} %")
        rows.append(row)
    return table(HEAD + ["throttle"], rows)


def run() -> str:
    nodes.up(count=2)
    out = ["### pause felt, 1 GiB, ~1 %/s\n"]
    text, pre = pause_vs_stop_and_copy()
    out += [text, "\n### a full layer's throughput vs raw TCP\n", throughput(pre),
            "\n### shaped links (tbf), 1 GiB, ~1 %/s\n", shaped_links(),
            "\n### dirtying faster than the link (64 MiB, CPU-bound writer: 40 µs per page, 24 MiB/s link)\n", auto_converge()]
    return "\n".join(out)
