"""The workload comes first: tracking leaves nothing behind, whatever way it ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CLEAN, MEMSNAP, json_lines, leftovers, memsnap
from memsnap.tracking import TrackingError, open_session
from memsnap.tracking.registry import availability

pytestmark = pytest.mark.skipif(not availability("uffd-wp").ok, reason="uffd-wp unavailable")


_trackers: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_tracker_left():
    """A tracker a failed test left running is killed (the next test's recovery cleans up)."""
    yield
    while _trackers:
        proc = _trackers.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def start_track(pid: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([*MEMSNAP, "track", "--pid", str(pid), "--json", "--interval", "0.2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _trackers.append(proc)
    return proc


def first_round(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return json_lines(line)[0]


def kill_tracker_after_a_round(pid: int) -> None:
    proc = start_track(pid)
    first_round(proc)
    proc.kill()
    proc.wait()


def test_stopping_leaves_the_target_as_it_was(workload):
    w = workload(mib=8)
    with open_session(w.pid) as session:
        session.start()
        assert leftovers(w.pid)["uffd_fds"] and leftovers(w.pid)["armed_vmas"]
    assert leftovers(w.pid) == CLEAN
    w.send("write 0 10")  # and it still works


def test_sigterm_ends_cleanly(workload):
    w = workload(mib=8)
    proc = start_track(w.pid)
    first_round(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert leftovers(w.pid) == CLEAN


def test_killed_tracker_is_cleaned_by_the_next_run(workload):
    w = workload(mib=8)
    kill_tracker_after_a_round(w.pid)
    left = leftovers(w.pid)
    assert left["uffd_fds"] and left["armed_vmas"] and not left["stopped"]
    w.send("write 0 10")  # the workload runs on meanwhile
    out = memsnap("untrack", check=True)
    assert f"cleaned pid {w.pid}" in out.stdout
    assert leftovers(w.pid) == CLEAN


def test_next_tracker_takes_over_after_a_kill(workload):
    w = workload(mib=8)
    kill_tracker_after_a_round(w.pid)
    out = memsnap("track", "--pid", str(w.pid), "--json", "--interval", "0.2", "--duration", "0.5", check=True)
    assert len(json_lines(out.stdout)) == 2
    assert leftovers(w.pid) == CLEAN


def test_second_tracker_on_the_same_target_is_refused(workload):
    w = workload(mib=8)
    with open_session(w.pid) as session:
        session.start()
        out = memsnap("track", "--pid", str(w.pid), "--duration", "0.5")
        assert out.returncode == 1
        assert "already tracked by memsnap pid" in out.stderr


def test_target_exit_ends_tracking(workload):
    w = workload(mib=8)
    proc = start_track(w.pid)
    first_round(proc)
    w.stop()
    assert proc.wait(timeout=10) == 0


def test_target_blocked_in_a_syscall_resumes_it(workload):
    w = workload(mib=8)
    w.start("sleep 1.0")
    time.sleep(0.2)
    with open_session(w.pid) as session:
        session.start()
        reply = w.finish()
        assert reply.startswith("ok")
        assert 1.0 <= float(reply.split()[1]) < 1.5  # slept once, fully: not cut short, not twice
        w.send("write 1 1")
        r = session.round()
        assert w.in_region(a for s in r.samples for a in s.dirty.addresses()) == w.pages(1, 1)


def test_tree_follows_forked_children(workload):
    w = workload(mib=4)
    with open_session(w.pid, tree=True) as session:
        session.start()
        child = int(w.send("fork 5"))
        r = session.round()
        assert child in r.started
        time.sleep(0.3)
        r = session.round()
        sample = next(s for s in r.samples if s.pid == child)
        assert w.pages(0, 5) <= set(sample.dirty.addresses())
        parent = next(s for s in r.samples if s.pid == w.pid)
        assert not w.in_region(parent.dirty.addresses())  # the child's writes are its own
    assert leftovers(child) == CLEAN
    assert leftovers(w.pid) == CLEAN
    os.kill(child, signal.SIGKILL)


def test_untracked_child_loses_the_inherited_fd_at_stop(workload):
    w = workload(mib=4)
    with open_session(w.pid) as session:
        session.start()
        child = int(w.send("fork 1"))
        assert leftovers(child)["uffd_fds"]  # fork copied the injected descriptor
    try:
        assert leftovers(child) == CLEAN
    finally:
        os.kill(child, signal.SIGKILL)


def test_exec_is_followed(workload):
    w = workload(mib=4)
    with open_session(w.pid) as session:
        session.start()
        w.start("exec")
        import json
        info = json.loads(w.proc.stdout.readline())
        w.base = info["base"]
        w.send("write 3 4")
        r = session.round()
        assert any(e.kind == "exec" for s in r.samples for e in s.events)
        w.send("write 9 2")
        r = session.round()
        assert w.in_region(a for s in r.samples for a in s.dirty.addresses()) == w.pages(9, 2)
    assert leftovers(w.pid) == CLEAN


def _kernel_has_seccomp_filters() -> bool:
    with open("/proc/self/status") as f:
        return any(line.startswith("Seccomp_filters:") for line in f)


needs_seccomp = pytest.mark.skipif(not _kernel_has_seccomp_filters(), reason="kernel without seccomp filters")


@needs_seccomp
def test_seccomp_errno_is_reported_and_harmless(workload):
    w = workload(mib=4)
    w.send("seccomp-deny userfaultfd errno")
    out = memsnap("track", "--pid", str(w.pid), "--backend", "uffd-wp", "--duration", "0.3")
    assert out.returncode == 1
    assert "seccomp filter would fail with an errno on userfaultfd()" in out.stderr
    w.send("write 0 1")
    assert leftovers(w.pid) == CLEAN


@needs_seccomp
def test_seccomp_kill_is_never_triggered(workload):
    w = workload(mib=4)
    w.send("seccomp-deny userfaultfd kill")
    with pytest.raises(TrackingError, match="would kill the process on userfaultfd"):
        open_session(w.pid, "uffd-wp").start()
    w.send("write 0 1")  # still alive


def test_already_traced_target(workload):
    w = workload(mib=4)
    tracer = subprocess.Popen([sys.executable, "-c", f"""
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
assert libc.ptrace(0x4206, {w.pid}, None, None) == 0
print("ok", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "ok"
        out = memsnap("track", "--pid", str(w.pid), "--backend", "uffd-wp", "--duration", "0.3")
        assert out.returncode == 1
        assert f"already traced by pid {tracer.pid}" in out.stderr
        # auto falls back to a backend that needs no ptrace, where there is one
        auto = memsnap("track", "--pid", str(w.pid), "--duration", "0.3", "--json")
        assert auto.returncode == (0 if availability("tracepoint").ok else 1), auto.stderr
    finally:
        tracer.kill()
        tracer.wait()


def test_target_using_userfaultfd_itself(workload):
    w = workload(mib=4)
    # Give the target a userfaultfd of its own, as a program using it would have.
    from memsnap import remote
    with remote.Session(w.pid) as s:
        own = s.check_call("userfaultfd", 0o2000000)
    with pytest.raises(TrackingError, match=f"already uses userfaultfd \\(fd {own}\\)"):
        open_session(w.pid, "uffd-wp").start()


def test_parked_target_resumes_in_another_tracker(workload):
    """Checkpoint chains: one run parks the target armed, the next picks up every write since,
    plus what the first collected but could not save."""
    from memsnap.tracking import VmaSelection, registry
    w = workload(mib=4)
    tracker, _, _ = registry.arm(w.pid, "uffd-wp", VmaSelection())
    w.send("write 0 3")
    unsaved = tracker.collect().dirty
    tracker.park(unsaved)
    assert leftovers(w.pid)["uffd_fds"]  # still armed between runs
    w.send("write 10 2")
    resumed = registry.resume(w.pid, VmaSelection())
    try:
        got = w.in_region(resumed.collect().dirty.addresses())
        assert got == w.pages(0, 3) | w.pages(10, 2)
        assert not w.in_region(resumed.collect().dirty.addresses())
    finally:
        resumed.close()
    assert leftovers(w.pid) == CLEAN


def test_untrack_cleans_a_parked_target(workload):
    from memsnap.tracking import VmaSelection, registry
    w = workload(mib=4)
    tracker, _, _ = registry.arm(w.pid, "uffd-wp", VmaSelection())
    tracker.park()
    memsnap("untrack", "--pid", str(w.pid), check=True)
    assert leftovers(w.pid) == CLEAN
