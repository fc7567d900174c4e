"""`memsnap track` as a user runs it: the JSON contract, the human view, and bad input."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import MEMSNAP, REPO, json_lines, memsnap
from memsnap.tracking.registry import availability

CONTRACT = {"time", "pid", "backend", "interval_seconds", "dirty_pages", "dirty_bytes",
            "tracked_bytes", "vmas", "vmas_added", "vmas_removed", "scan_seconds"}
uffd = pytest.mark.skipif(not availability("uffd-wp").ok, reason="uffd-wp unavailable")


@uffd
def test_json_rounds_follow_the_contract(workload):
    w = workload(mib=32)
    w.send("churn 2000 60")  # outlives the tracker, however slow it is to start
    out = memsnap("track", "--pid", str(w.pid), "--json", "--interval", "0.5", "--duration", "2", check=True)
    rounds = json_lines(out.stdout)
    assert len(rounds) == 4
    for r in rounds:
        assert CONTRACT <= r.keys()
        assert r["pid"] == w.pid and r["backend"] == "uffd-wp"
        assert r["dirty_bytes"] == r["dirty_pages"] * w.page
        assert r["tracked_bytes"] >= 32 << 20
        assert 0.3 < r["interval_seconds"] < 1.0
    # 2000 random pages/s over 8192 pages: up to ~1000 distinct ones per round (fewer when the
    # machine is busy), never more than the region and the interpreter's own pages
    assert all(50 < r["dirty_pages"] < 1600 for r in rounds), [r["dirty_pages"] for r in rounds]


@uffd
def test_human_view(workload):
    w = workload(mib=8)
    out = memsnap("track", "--pid", str(w.pid), "--interval", "0.3", "--duration", "0.7", check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("backend uffd-wp:")
    assert "pages/s" in lines[1] and "MiB/s" in lines[1]
    assert len(lines) == 4


def test_no_such_pid():
    out = memsnap("track", "--pid", "4194303", "--duration", "1")
    assert out.returncode == 1
    assert out.stderr.strip() == "memsnap track: no process with pid 4194303"


@pytest.mark.parametrize("args, message", [
    (["--backend", "magic"], "unknown backend 'magic'"),
    (["--interval", "0"], "--interval must be positive"),
    (["--duration", "-1"], "--duration must be positive"),
    (["--vmas", "heap,bogus"], "unknown VMA kind bogus"),
])
def test_bad_arguments(args, message):
    out = memsnap("track", "--pid", str(os.getpid()), *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_not_permitted(workload):
    """An unprivileged user cannot track root's processes, and is told why."""
    w = workload(mib=1)
    pkg = Path(tempfile.mkdtemp(prefix="memsnap-pkg-"))
    try:
        os.chmod(pkg, 0o755)
        shutil.copytree(REPO / "node-agent" / "memsnap", pkg / "memsnap")
        subprocess.run(["chmod", "-R", "a+rX", str(pkg)], check=True)
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                              "/usr/bin/python3", "-m", "memsnap.cli", "track", "--pid", str(w.pid), "--duration", "1"],
                             capture_output=True, text=True, cwd=pkg, env={"PATH": "/usr/bin:/bin", "MEMSNAP_RUN_DIR": str(pkg / "run")})
    finally:
        shutil.rmtree(pkg)
    assert out.returncode == 1, out.stderr
    assert f"not permitted to track pid {w.pid}" in out.stderr


def test_soft_dirty_missing_names_the_kernel_feature(workload):
    if availability("soft-dirty").ok:
        pytest.skip("this kernel has soft-dirty")
    w = workload(mib=1)
    out = memsnap("track", "--pid", str(w.pid), "--backend", "soft-dirty", "--duration", "0.5")
    assert out.returncode == 1
    assert "CONFIG_MEM_SOFT_DIRTY" in out.stderr


def test_tracepoint_missing_names_the_kernel_patch(workload):
    w = workload(mib=1)
    out = memsnap("track", "--pid", str(w.pid), "--backend", "tracepoint", "--duration", "0.5")
    if out.returncode == 0:
        pytest.skip("this kernel has memsnap's write-event patch")
    assert out.returncode == 1
    assert "write-event patch" in out.stderr


@uffd
def test_tree_via_cli(workload):
    w = workload(mib=4)
    proc = subprocess.Popen([*MEMSNAP, "track", "--pid", str(w.pid), "--tree", "--json",
                             "--interval", "0.2", "--duration", "4"], stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # tracking has started
    child = int(w.send("fork 3"))
    try:
        rounds = json_lines(first + proc.communicate(timeout=60)[0])
    finally:
        os.kill(child, 9)
    assert proc.returncode == 0
    assert any(child in r["started"] for r in rounds)
    assert any(p["pid"] == child and p["dirty_pages"] >= 3 for r in rounds for p in r["processes"])
