"""The target restores lazily: the workload runs before its pre-copied memory is read, the
memory is filled in the background, exact, and a fill that fails rolls the migration back."""
from __future__ import annotations

import subprocess

import pytest

from memsnap import nodes

from .conftest import assert_nothing_on, assert_untouched, migrate, sh

pytestmark = [pytest.mark.nodes, pytest.mark.slow, pytest.mark.timeout(600)]

PAGE = 4096


def test_restore_leaves_the_precopied_memory_to_the_background_fill(ticker):
    t = ticker("node-1", mib=64, rate=300)
    rc, events, err = migrate("node-1", t.pid, "node-2")
    assert rc == 0, err
    done = events[-1]
    # CRIU's restore skipped these pages (its nr_lazy): the workload ran before they were read.
    assert done["lazy_pages"] >= 0.9 * (64 << 20) // PAGE, done
    assert done["fill_seconds"] > 0, done
    t.moved("node-2", done["target_pid"])
    report = t.check()
    assert report["ok"] and report["bad_pages"] == 0 and report["host"] == "node-2", report
    assert not sh("node-2", "pgrep -f '[c]riu lazy-pages' || true").stdout.strip(), "the fill daemon stays"


# On node-2: stop the lazy-pages daemon as soon as the restore has returned, and kill it once
# the restored workload runs there (the commit then waits for the fill).
KILL_THE_FILL = r"""
import os, signal, subprocess, sys, time

def criu(arg):
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"criu") and arg in argv:
            return int(p)

deadline = time.monotonic() + 90
restoring = False
while True:  # the restore needs the daemon: stop it only once the restore has returned
    pid, restore = criu(b"lazy-pages"), criu(b"--lazy-pages")
    restoring = restoring or bool(restore)
    if restoring and not restore and pid:
        break
    if time.monotonic() > deadline:
        sys.exit("no lazy restore came")
    time.sleep(0.001)
os.kill(pid, signal.SIGSTOP)
while sys.argv[1] not in subprocess.run(["memsnap", "containers", "list"], capture_output=True, text=True).stdout:
    if time.monotonic() > deadline:
        sys.exit("the workload was not restored")
    time.sleep(0.02)
os.kill(pid, signal.SIGKILL)
print("killed", pid)
"""


def test_a_failed_background_fill_rolls_the_migration_back(ticker):
    t = ticker("node-1", mib=256, rate=300)  # a fill that lasts long enough to be caught
    killer = nodes.popen("node-2", ["python3", "-c", KILL_THE_FILL, t.name],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rc, events, err = migrate("node-1", t.pid, "node-2")
        out, kerr = killer.communicate(timeout=120)
    finally:
        if killer.poll() is None:
            killer.kill()
    assert "killed" in out, (kerr, err)
    assert rc != 0 and "background fill" in err, err
    assert_untouched(t)
    assert_nothing_on("node-2", t)
