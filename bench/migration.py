"""Benchmark 7 (two local nodes): live migration with `memsnap migrate`.

- The pause the workload itself feels (its gap between two of its 1 ms ticks that spans the
  freeze, by the wall clock; the longest gap anywhere in the migration, pre-copy and fill
  included, is shown beside it) for a 1 GiB workload dirtying ~1 % of its memory per second: memsnap's pre-copy
  against stop-and-copy (freeze, dump everything, copy, restore) over the same agents and TLS.
- A full layer's throughput between the agents (TLS) against raw TCP between the same nodes.
- Links shaped with tc (tbf: 1 Gbit/s and 10 Gbit/s): total time and pause, both modes.
- A workload that dirties faster than the link carries: without --auto-converge it fails at
  the progress timeout; with it, it converges at some throttle.
- The pause by memory size (256 MiB, 1 GiB, 4 GiB, all dirtying the same pages per second),
  against the goals (4 GiB <= 1.3x 256 MiB, <= 300 ms at 1 GiB, <= 0.1x stop-and-copy at
  1 GiB), and what the target's background fill costs the workload while it runs: its ticks
  and writes per second and its tick gaps during the fill against the seconds after it.
"""
from __future__ import annotations

import json
import subprocess
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
        self.report, self.timeline = f"/tmp/{self.name}.json", f"/tmp/{self.name}.timeline.json"
        self.pid = int(sh(SRC, f"memsnap containers run --name {self.name} -- python3 -m memsnap.ticker "
                               f"--mib {mib} --rate {rate} --cost-us {cost_us} --report {self.report} "
                               f"--timeline {self.timeline}"))
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

    def ticks(self) -> tuple[list[float], list[int]]:
        """The wall-clock times and write counts of its last ticks, as of the last check()."""
        data = json.loads(sh(self.node, f"cat {self.timeline}"))
        return data["times"], data["writes"]

    def migrate(self, *args: str, settle: float = 0.0) -> dict:
        """settle: seconds to let it run on the target before checking it (a window after the fill)."""
        to = DST if self.node == SRC else SRC
        self.reset_gap()
        out = nodes.run(self.node, ["memsnap", "migrate", "--pid", str(self.pid), "--to", to, "--json", *args],
                        capture_output=True, text=True, timeout=900)
        events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        last = events[-1] if events else {"event": "error", "error": out.stderr.strip()}
        if last["event"] == "done":
            self.node, self.pid = to, last["target_pid"]
            time.sleep(settle)
            report = self.check()
            if not report["ok"]:
                raise RuntimeError(f"memory differs after the migration: {report}")
            last["longest_gap_ms"] = report["longest_gap_ms"]  # anywhere: pre-copy, pause, fill
            last["felt_ms"], last["resumed_tick"] = self._gap_over(last["frozen_at"])
        last["rounds"] = [e for e in events if e["event"] == "round"]
        last["fills"] = [e for e in events if e["event"] == "fill"]
        return last

    def _gap_over(self, when: float) -> tuple[float, float]:
        """The pause as the workload felt it: its gap between ticks that spans `when` (the
        freeze, wall clock), in ms, and the time of the tick that ended it."""
        times, _ = self.ticks()
        after = next((i for i, t in enumerate(times) if t > when), None)
        if not after:
            raise RuntimeError("the ticker's timeline does not reach back to the freeze")
        return (times[after] - times[after - 1]) * 1000, times[after]

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


SIZES_MIB = (256, 1024, 4096)
SAME_RATE = 1024 * MIB // 4096 // 100  # pages/s: 1 % of 1 GiB per second, for every size


RUNS = 3  # migrations per size, back and forth between the nodes: the median one is the figure


def pause_by_size(sizes: tuple[int, ...] = SIZES_MIB) -> str:
    """Every size dirtying the same pages per second, pre-copy, RUNS times (the median run
    shown, with every run's felt pause); stop-and-copy at 1 GiB once. The fill's cost is read
    from the ticker's own timeline of the median run."""
    pauses, fills, stop = {}, [], None
    _warm_up()
    for mib in sizes:
        t = Ticker(mib, rate=SAME_RATE)
        runs = []
        try:
            for _ in range(RUNS):
                subprocess.run(["sync"], check=False)  # no writeback of earlier runs' files meanwhile
                run = t.migrate(settle=3.0)
                if run["event"] == "done":
                    run["fill_row"] = _fill_cost(f"{mib} MiB", run, *t.ticks())
                runs.append(run)
            if mib == 1024:
                stop = t.migrate("--stop-and-copy")
        finally:
            t.stop()
        pauses[mib] = _median(runs)
        if "fill_row" in pauses[mib]:
            fills.append(pauses[mib]["fill_row"])
    rows = [_size_row(mib, r) for mib, r in pauses.items()]
    if stop is not None:
        rows.append(_size_row(1024, stop, "stop-and-copy"))
    felt = {mib: r.get("felt_ms") for mib, r in pauses.items()}
    goals = [_goal("4 GiB / 256 MiB pause", _ratio(felt.get(4096), felt.get(256)), 1.3, "x"),
             _goal("1 GiB pause", felt.get(1024), 300, " ms"),
             _goal("1 GiB pause / stop-and-copy", _ratio(felt.get(1024), (stop or {}).get("felt_ms")), 0.1, "x")]
    return "\n".join([table(SIZE_HEAD, rows), "", table(["goal", "measured", "target", "met"], goals), "",
                      "what the background fill costs the workload (ticks: its 1 ms loop; writes: pages it wrote)", "",
                      table(FILL_HEAD, fills)])


def _median(runs: list[dict]) -> dict:
    """The run with the median felt pause, noting every run's; a failed run if any failed."""
    failed = [r for r in runs if r["event"] != "done"]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["felt_ms"])
    return {**ordered[len(ordered) // 2], "runs_felt_ms": [round(r["felt_ms"]) for r in runs]}


def _warm_up(mib: int = 64) -> None:
    """One migration not counted: a node's first CRIU run probes the kernel (CRIU caches what
    it learns in /run/criu.kdat) and an agent's first migration loads its modules, ~80 ms that
    would otherwise land on whichever size is measured first."""
    t = Ticker(mib, rate=SAME_RATE)
    try:
        t.migrate(settle=1.0)
    finally:
        t.stop()


SIZE_HEAD = ["memory", "mode", "pause felt ms", "runs felt ms", "pause ms (agent)", "longest gap ms", "phases ms",
             "final MiB", "lazy MiB", "fill s", "total s", "rounds"]
FILL_HEAD = ["memory", "fill s", "ticks/s during", "ticks/s after", "writes/s during", "writes/s after",
             "p99 gap ms during", "p99 gap ms after", "max gap ms during", "max gap ms after"]


def _size_row(mib: int, r: dict, mode: str = "pre-copy") -> list:
    if r["event"] != "done":
        return [f"{mib} MiB", mode, "failed", "-", "-", "-", r["error"][:80], "-", "-", "-", "-", "-"]
    phases = ", ".join(f"{k} {v:.0f}" for k, v in r["pause_phases"].items())
    if r.get("restore_phases"):  # where the target's restore went
        phases += " (restore: " + ", ".join(f"{k} {v:.0f}" for k, v in r["restore_phases"].items()) + ")"
    runs = "/".join(str(ms) for ms in r.get("runs_felt_ms", [round(r["felt_ms"])]))
    return [f"{mib} MiB", mode, f"{r['felt_ms']:.0f}", runs, f"{r['downtime_ms']:.0f}", f"{r['longest_gap_ms']:.0f}", phases,
            f"{r.get('final_layer_bytes', 0) / MIB:.1f}", f"{r.get('lazy_pages', 0) * 4096 / MIB:.0f}", f"{r.get('fill_seconds') or 0:.2f}",
            f"{r['total_seconds']:.1f}", r["iterations"]]


def _ratio(a, b):
    return a / b if a and b else None


def _goal(what: str, value, target: float, unit: str) -> list:
    if value is None:
        return [what, "not measured", f"<= {target}{unit}", "-"]
    shown = f"{value:.2f}{unit}" if unit == "x" else f"{value:.0f}{unit}"
    return [what, shown, f"<= {target}{unit}", "yes" if value <= target else "NO"]


def _fill_cost(label: str, r: dict, times: list[float], writes: list[int]) -> list:
    """The ticker's ticks and writes per second, and its gaps between ticks, while the target
    filled its memory in (from the end of the pause for fill_seconds) against the 2 s after."""
    resumed = r["resumed_tick"]  # the tick that ended the pause
    fill = r.get("fill_seconds") or 0.0
    during = _window(times, writes, resumed, resumed + fill)
    after = _window(times, writes, resumed + fill + 0.5, resumed + fill + 2.5)
    cells = [label, f"{fill:.2f}"]
    for k, form in enumerate(("{:.0f}", "{:.0f}", "{:.1f}", "{:.1f}")):
        cells += [form.format(during[k]), form.format(after[k])]
    return cells


def _window(times: list[float], writes: list[int], lo: float, hi: float) -> tuple[float, float, float, float]:
    """ticks/s, writes/s, p99 and max gap (ms) of the ticks in [lo, hi]."""
    idx = [i for i, t in enumerate(times) if lo <= t <= hi]
    if len(idx) < 2:
        return (0.0, 0.0, 0.0, 0.0)
    span = times[idx[-1]] - times[idx[0]]
    gaps = sorted((times[i] - times[i - 1]) * 1000 for i in idx[1:])
    return (len(idx) / span, (writes[idx[-1]] - writes[idx[0]]) / span, gaps[int(0.99 * (len(gaps) - 1))], gaps[-1])


def run() -> str:
    nodes.up(count=2)
    out = ["### pause felt, 1 GiB, ~1 %/s\n"]
    text, pre = pause_vs_stop_and_copy()
    out += [text, "\n### a full layer's throughput vs raw TCP\n", throughput(pre),
            "\n### shaped links (tbf), 1 GiB, ~1 %/s\n", shaped_links(),
            "\n### dirtying faster than the link (64 MiB, CPU-bound writer: 40 µs per page, 24 MiB/s link)\n", auto_converge(),
            "\n### pause by memory size, all dirtying 10 MiB/s, and the fill's cost\n", pause_by_size()]
    return "\n".join(out)
