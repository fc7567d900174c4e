"""`memsnap migrate` between local nodes: the workload moves with its memory exact, and every
failure leaves it running on the source as it was, with nothing left on the target."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from memsnap import nodes
from memsnap.nodes import agents

from .conftest import assert_nothing_on, assert_untouched, migrate, sh

pytestmark = [pytest.mark.nodes, pytest.mark.slow, pytest.mark.timeout(600)]


def test_nodes_run_starts_a_container(ticker):
    t = ticker("node-1", mib=8)
    status = sh("node-1", 'grep -E "^NSpid" /proc/"$1"/status', str(t.pid)).stdout.split()
    assert status[1:] == [str(t.pid), "1"], f"not the init of its own PID namespace: {status}"
    sid = sh("node-1", 'ps -o sid= -p "$1"', str(t.pid)).stdout.strip()
    assert sid == str(t.pid), "not the leader of its own session"
    fds = sh("node-1", 'ls /proc/"$1"/fd', str(t.pid)).stdout.split()
    assert sorted(fds) == ["0", "1", "2"], fds
    assert f"/containers/{t.name}" in sh("node-1", 'cat /proc/"$1"/cgroup', str(t.pid)).stdout


def test_migrate_moves_a_workload_with_its_memory_exact(ticker):
    t = ticker("node-1", mib=64, rate=300)
    rc, events, err = migrate("node-1", t.pid, "node-2")
    assert rc == 0, err
    rounds = [e for e in events if e["event"] == "round"]
    done = events[-1]
    assert done["event"] == "done" and rounds, events
    for key in ("target_pid", "downtime_ms", "iterations", "transferred_bytes", "memory_bytes",
                "converged", "total_seconds", "pause_phases"):
        assert key in done, key
    assert done["transferred_bytes"] >= 64 << 20 and done["converged"]
    phases = set(done["pause_phases"])
    assert {"freeze", "collect", "memory delta", "transfer", "merge", "restore", "until running"} <= phases, phases
    assert phases & {"criu dump", "criu state dump"}, phases
    assert done["vma_flags"] == "read before the freeze"  # CRIU walked no page table for them
    for r in rounds:
        assert {"iteration", "bytes_sent", "dirty_pages", "dirty_rate", "bandwidth", "predicted_downtime_ms"} <= set(r)
    source_pid = t.pid
    assert sh("node-1", 'test -e /proc/"$1" && echo alive || echo gone', str(source_pid)).stdout.strip() == "gone"
    t.moved("node-2", done["target_pid"])
    assert t.state() in ("S", "R")
    report = t.check()
    assert report["ok"] and report["bad_pages"] == 0 and report["host"] == "node-2", report
    assert report["writes"] > 0
    assert f"/containers/{t.name}" in sh("node-2", 'cat /proc/"$1"/cgroup', str(t.pid)).stdout
    assert "memsnap-" not in sh("node-2", 'cat /proc/"$1"/cgroup', str(t.pid)).stdout
    # and back again: a restored workload migrates like any other
    rc, events, err = migrate("node-2", t.pid, "node-1")
    assert rc == 0, err
    t.moved("node-1", events[-1]["target_pid"])
    assert t.check()["ok"]


@pytest.mark.parametrize("to,why", [("node-9", "unknown node"), ("node-1", "this node"),
                                    ("node-2:9999", "cannot reach the agent of node-2")])
def test_bad_target_is_refused_and_the_workload_untouched(ticker, to, why):
    t = ticker("node-1", mib=8)
    rc, events, err = migrate("node-1", t.pid, to)
    assert rc != 0 and why in err and len(err.strip().splitlines()) == 1, err
    assert_untouched(t)


def test_no_such_pid(local_nodes):
    rc, _, err = migrate("node-1", 999999, "node-2")
    assert rc != 0 and "no process with pid 999999" in err, err


def test_a_workload_criu_cannot_dump_is_refused_and_untouched(ticker):
    # An established TCP connection to a peer outside the workload: CRIU will not dump it.
    connect = ('import os, socket, sys; s = socket.create_connection(("node-1", 9651)); '
               'os.set_inheritable(s.fileno(), True); os.execvp(sys.argv[1], sys.argv[1:])')
    t = ticker("node-1", mib=8, prefix=["python3", "-c", connect])
    rc, events, err = migrate("node-1", t.pid, "node-2")
    assert rc != 0 and "criu dump failed" in err and len(err.strip().splitlines()) == 1, err
    assert_untouched(t)
    assert_nothing_on("node-2", t)


def test_restore_failure_on_the_target_rolls_back(ticker):
    # The workload holds a file that exists only on node-1: CRIU cannot restore it on node-2.
    sh("node-1", "echo only-here > /tmp/only-on-node-1")
    t = ticker("node-1", mib=16, wrap="exec 3</tmp/only-on-node-1;")
    rc, events, err = migrate("node-1", t.pid, "node-2")
    assert rc != 0 and "restore failed" in err, err
    assert_untouched(t)
    assert_nothing_on("node-2", t)


def test_target_disk_full_rolls_back(ticker):
    sh("node-2", "mkdir -p /var/lib/memsnap/incoming && mount -t tmpfs -o size=2m,mode=700 full /var/lib/memsnap/incoming")
    try:
        t = ticker("node-1", mib=16)
        rc, events, err = migrate("node-1", t.pid, "node-2")
        assert rc != 0 and "no space left" in err, err
        assert_untouched(t)
        assert_nothing_on("node-2", t)
    finally:
        sh("node-2", "umount /var/lib/memsnap/incoming", check=False)


def test_timeout_fails_clean_when_the_workload_outruns_the_link(ticker):
    t = ticker("node-1", mib=32, rate=3000)
    rc, events, err = migrate("node-1", t.pid, "node-2", "--bandwidth", "4", "--max-downtime-ms", "5",
                              "--completion-timeout-per-gib", "100", "--progress-timeout", "3")
    assert rc != 0 and ("progress" in err or "converge" in err), err
    assert_untouched(t)
    assert_nothing_on("node-2", t)


def _start_migration(t, *args: str) -> subprocess.Popen:
    return nodes.popen("node-1", ["memsnap", "migrate", "--pid", str(t.pid), "--to", "node-2", "--json", *args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_round(proc: subprocess.Popen) -> None:
    while True:
        line = proc.stdout.readline()
        assert line, f"migrate ended before its first round: {proc.stderr.read()}"
        if '"round"' in line:
            return


def _still_held(t) -> bool:
    """Whether memsnap still holds the workload (frozen cgroup, userfaultfd)."""
    probe = sh("node-1", 'cat /proc/"$1"/cgroup; ls -l /proc/"$1"/fd', str(t.pid)).stdout
    return "memsnap-" in probe or "userfaultfd" in probe


@pytest.mark.parametrize("fault", ["migrate killed", "target agent killed", "link down"])
def test_a_fault_mid_precopy_leaves_the_workload_on_the_source(ticker, fault):
    t = ticker("node-1", mib=48, rate=2000)
    agents.start([nodes.get("node-2")])  # an earlier run may have left it dead
    proc = _start_migration(t, "--bandwidth", "16", "--max-downtime-ms", "1")
    try:
        _wait_round(proc)
        if fault == "migrate killed":
            proc.send_signal(signal.SIGKILL)
        elif fault == "target agent killed":
            sh("node-2", "pkill -KILL -f '[a]gent --listen'")
        else:
            sh("node-2", "ip link set eth0 down")
        out, err = proc.communicate(timeout=120)
        if fault != "migrate killed":
            assert proc.returncode != 0, out
        # The source agent rolls back by itself (a vanished client is noticed between steps).
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _still_held(t):
            time.sleep(0.5)
        assert_untouched(t)
    finally:
        if proc.poll() is None:
            proc.kill()
        sh("node-2", "ip link set eth0 up", check=False)
        if fault == "target agent killed":  # as a DaemonSet would: it comes back and cleans up
            agents.start([nodes.get("node-2")])
    assert_nothing_on("node-2", t)


SERVER = """
import socket
s = socket.create_server(("0.0.0.0", 8080))
served = 0
while True:
    c, _ = s.accept()
    served += 1
    c.sendall(f"{socket.gethostname()} {served}".encode())
    c.close()
"""


def test_a_listening_server_moves_and_keeps_serving(local_nodes):
    # CRIU must dump inet sockets on kernels since 6.16 (memsnap's CRIU, node-agent/criu/patches/0001).
    name = "srv-test"
    pid = int(sh("node-1", 'memsnap containers run --name "$1" -- python3 -c "$2"', name, SERVER).stdout)
    try:
        ask = 'python3 -c "import socket,sys; print(socket.create_connection((sys.argv[1], 8080), 5).recv(64).decode())" "$1"'
        deadline = time.monotonic() + 30
        while sh("node-2", ask, "node-1", check=False).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        host, before = sh("node-2", ask, "node-1").stdout.split()
        assert host == "node-1"
        rc, events, err = migrate("node-1", pid, "node-2")
        assert rc == 0, err
        host, after = sh("node-1", ask, "node-2").stdout.split()
        assert host == "node-2" and int(after) == int(before) + 1, (before, after)  # the same process, counting on
    finally:
        for node in ("node-1", "node-2"):
            sh(node, 'memsnap containers stop "$1" 2>/dev/null || true', name, check=False)


def test_a_target_with_a_certificate_from_another_ca_is_refused(ticker):
    # A rogue agent on node-2, port 9700, with a certificate naming node-2 from a CA of its own.
    sh("node-2", """
        set -e; mkdir -p /tmp/rogue && cd /tmp/rogue
        python3 -c 'from memsnap import pki; from pathlib import Path
ca = pki.CA.new("rogue CA"); c = ca.issue_node("node-2", "198.18.0.12")
pki.write_credentials(c, pki.TlsFiles(Path("node.crt"), Path("node.key"), Path("ca.crt")), ca.cert_pem)'
        setsid memsnap agent --listen 198.18.0.12:9700 --metrics-listen none --kubeconfig none \
            --tls-cert node.crt --tls-key node.key --tls-ca ca.crt </dev/null >rogue.log 2>&1 &
        sleep 3""")
    try:
        t = ticker("node-1", mib=8)
        rc, events, err = migrate("node-1", t.pid, "node-2:9700")
        assert rc != 0 and "certificate" in err and len(err.strip().splitlines()) == 1, err
        assert_untouched(t)
    finally:
        sh("node-2", "pkill -f '[9]700' ; rm -rf /tmp/rogue", check=False)
