"""Migration tests: real agents in real local nodes, real CRIU, real mutual TLS."""
from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from memsnap import nodes
from memsnap.nodes.testing import local_nodes  # noqa: F401  (a fixture)


def sh(node: str, script: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = nodes.run(node, ["sh", "-c", script, "sh", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"on {node}: {script!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Ticker:
    """A memsnap.ticker container in a node, followed wherever it moves."""

    def __init__(self, node: str, mib: int = 32, rate: float = 200.0, wrap: str = "", prefix: list[str] = ()):
        self.name = f"t-{uuid.uuid4().hex[:8]}"
        self.report = f"/tmp/{self.name}.json"
        self.node = node
        cmd = ["python3", "-m", "memsnap.ticker", "--mib", str(mib), "--rate", str(rate), "--report", self.report]
        if wrap:  # e.g. "exec 3</tmp/x;": a shell sets something up, then becomes the ticker
            cmd = ["sh", "-c", wrap + ' exec "$@"', "sh", *cmd]
        cmd = [*prefix, *cmd]  # e.g. a program that sets something up, then execs the ticker
        out = nodes.run(node, ["memsnap", "containers", "run", "--name", self.name, "--", *cmd],
                      capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        self.pid = int(out.stdout.strip())
        self._wait_report(lambda r: r.get("ready") or "ok" in r)

    def _read(self) -> dict:
        proc = sh(self.node, 'cat "$1" 2>/dev/null || true', self.report)
        return json.loads(proc.stdout) if proc.stdout.strip() else {}

    def _wait_report(self, done, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = self._read()
            if report and done(report):
                return report
            time.sleep(0.1)
        pytest.fail(f"ticker {self.name} on {self.node} did not report")

    def check(self) -> dict:
        """Ask the ticker to check its memory; returns its report (ok, bad_pages, longest_gap_ms)."""
        sh(self.node, 'rm -f "$1"; kill -USR1 "$2"', self.report, str(self.pid))
        return self._wait_report(lambda r: "ok" in r)

    def moved(self, node: str, pid: int) -> None:
        self.node, self.pid = node, pid

    def state(self) -> str:
        proc = sh(self.node, 'cut -d" " -f3 /proc/"$1"/stat 2>/dev/null || echo gone', str(self.pid))
        return proc.stdout.strip()

    def stop(self) -> None:
        for node in ("node-1", "node-2"):
            sh(node, 'memsnap containers stop "$1" 2>/dev/null || true', self.name, check=False)


@pytest.fixture
def ticker(local_nodes):  # noqa: F811
    made: list[Ticker] = []

    def make(node: str = "node-1", **kw) -> Ticker:
        t = Ticker(node, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


def migrate(node: str, pid: int, to: str, *args: str, timeout: float = 300) -> tuple[int, list[dict], str]:
    """`memsnap migrate --json` on node: exit code, events, stderr."""
    proc = nodes.run(node, ["memsnap", "migrate", "--pid", str(pid), "--to", to, "--json", *args],
                     capture_output=True, text=True, timeout=timeout)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, events, proc.stderr


def assert_untouched(t: Ticker) -> None:
    """The workload runs where it was, as it was: thawed, untracked, memory exact."""
    assert t.state() in ("S", "R"), f"the workload is in state {t.state()}"
    fds = sh(t.node, 'ls -l /proc/"$1"/fd', str(t.pid)).stdout
    assert "userfaultfd" not in fds, fds
    cg = sh(t.node, 'cat /proc/"$1"/cgroup', str(t.pid)).stdout
    assert "memsnap-" not in cg and f"/containers/{t.name}" in cg, cg
    report = t.check()
    assert report["ok"] and report["host"] == t.node, report


def assert_nothing_on(node: str, t: Ticker) -> None:
    """No restored process, no images, no container left by a failed migration."""
    deadline = time.monotonic() + 40  # an unreachable target cleans up when its lease runs out
    while True:
        left = sh(node, 'ls -A /var/lib/memsnap/incoming 2>/dev/null; '
                        'memsnap containers list | grep -w "$1" || true', t.name).stdout.strip()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"{node} still holds: {left}"


# Python for a node, inside a script that has found the lazy-pages daemon `pid`: the daemon into
# a cpu cgroup of its own, `quota` µs of CPU per 250 ms, so that its fill crawls; `cg` is that
# cgroup, and UNCRAWL removes it once the daemon is gone.
CRAWL = r"""
from memsnap import cgroupfs
mounts = cgroupfs.hierarchies()
kind = "cpu" if "cpu" in mounts else "cgroup2"
cg = mounts[kind] / cgroupfs.membership(pid)[kind].lstrip("/") / "memsnap-test-slow-fill"
cg.mkdir()
if kind == "cpu":
    (cg / "cpu.cfs_period_us").write_text("250000")
    (cg / "cpu.cfs_quota_us").write_text(str(quota))
else:
    (cg / "cpu.max").write_text(f"{quota} 250000")
(cg / "cgroup.procs").write_text(str(pid))
"""
UNCRAWL = r"""
for _ in range(50):
    try:
        cg.rmdir()
        break
    except OSError:
        time.sleep(0.1)
"""
