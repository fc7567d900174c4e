"""`memsnap agent` as a user runs it: a real server tracking real processes in real pod cgroups,
checked over HTTP against the ground truth of the sample workload."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import CLEAN, leftovers
from .conftest import AGENT, wait_for

pytestmark = pytest.mark.slow

MIB = 1 << 20
RATE = "memsnap_dirty_bytes_per_second"


def labels(cg, container: str | None = None) -> dict:
    """The series labels of a container without Kubernetes API: UID for pod, ID for container."""
    return {"namespace": "", "pod": cg.pod_uid, "container": cg.container_id if container is None else container}


def tracked(agent, cg) -> dict | None:
    """The pod's API entry once its processes are tracked (a round has run), else None."""
    pod = agent.pod(cg.pod_uid)
    if pod and all(p.get("backend") for c in pod["containers"] for p in c["processes"]):
        return pod
    return None


@pytest.mark.parametrize("layout", ["v1-cgroupfs-containerd", "v2-systemd-crio"])
def test_dirty_rate_matches_a_known_workload(layout, agent, cgroups, workload):
    # 4 MiB written over and over, every page several times per second: each 1 s round must
    # report the whole region dirty, i.e. 4 MiB/s, plus the few pages the interpreter writes.
    cg = cgroups.pod(layout)
    w = workload(mib=4)
    cgroups.place(w.pid, cg)
    a = agent(interval=1.0)
    wait_for(lambda: tracked(a, cg), what="the workload tracked")
    w.send("churn 40000 30")
    # Skip the round in which churn began: it also holds the churn thread's new stack.
    cycles = a.value("memsnap_agent_cycles_total")
    wait_for(lambda: a.value("memsnap_agent_cycles_total") >= cycles + 2, what="two cycles")

    def steady():
        rates = []
        for _ in range(4):
            wait_for(lambda: (v := a.value(RATE, **labels(cg))) is not None and v > 0, what="a rate")
            rates.append(a.value(RATE, **labels(cg)))
            cycles = a.value("memsnap_agent_cycles_total")
            wait_for(lambda: a.value("memsnap_agent_cycles_total") > cycles, what="the next cycle")
        return rates
    rates = steady()
    assert 4 * MIB * 0.95 <= max(rates) <= 4 * MIB * 1.25, [r / MIB for r in rates]
    assert 4 * MIB * 0.95 <= sorted(rates)[1], [r / MIB for r in rates]

    m = a.metrics()
    tracked_bytes = m[("memsnap_tracked_bytes", tuple(sorted(labels(cg).items())))]
    assert 4 * MIB < tracked_bytes < 64 * MIB  # the region plus the interpreter's own memory
    wss = m[("memsnap_writable_working_set_bytes", tuple(sorted(labels(cg).items())))]
    assert 4 * MIB <= wss < 4 * MIB + 8 * MIB
    assert m[("memsnap_tracked_processes", tuple(sorted(labels(cg).items())))] == 1
    pod = a.pod(cg.pod_uid)
    assert pod["name"] == cg.pod_uid and pod["namespace"] == ""
    assert [p["pid"] for p in pod["containers"][0]["processes"]] == [w.pid]


def test_dirty_pages_count_exactly_the_pages_written(agent, cgroups, workload):
    cg = cgroups.pod("v1-systemd-containerd")
    w = workload(mib=16)
    cgroups.place(w.pid, cg)
    a = agent(interval=1.0)
    wait_for(lambda: tracked(a, cg), what="the workload tracked")
    key = ("memsnap_dirty_pages_total", tuple(sorted(labels(cg).items())))
    before = wait_for(lambda: a.metrics().get(key), what="the dirty page counter") \
        if a.metrics().get(key) is None else a.metrics()[key]
    cycles = a.value("memsnap_agent_cycles_total")
    w.send("write 0 3000")
    w.send("write 1000 3000")  # overlaps: 4000 distinct pages, some written twice
    wait_for(lambda: a.value("memsnap_agent_cycles_total") >= cycles + 2, what="two cycles")
    grown = a.metrics()[key] - before
    # 3000 + 3000 pages written; a page written twice within one round counts once
    assert 4000 <= grown <= 6000 + 200, grown


def test_pods_are_picked_up_and_dropped_within_an_interval(agent, cgroups, workload):
    a = agent(interval=1.0)
    cg = cgroups.pod("v2-cgroupfs-crio")
    w = workload(mib=1)
    cgroups.place(w.pid, cg)
    wait_for(lambda: tracked(a, cg), timeout=2 * 1.0 + 3, what="the new pod tracked")
    wait_for(lambda: a.value(RATE, **labels(cg)) is not None, timeout=5, what="its rate exported")
    w.stop()
    wait_for(lambda: a.pod(cg.pod_uid) is None, timeout=2 * 1.0 + 3, what="the pod dropped")
    assert a.value(RATE, **labels(cg)) is None


def test_memory_cap_skips_what_does_not_fit_and_says_why(agent, cgroups, workload):
    first, second = cgroups.pod("v1-cgroupfs-containerd"), cgroups.pod("v1-cgroupfs-containerd")
    w1, w2 = workload(mib=64), workload(mib=64)  # about 71 MiB of writable memory each
    cgroups.place(w1.pid, first)
    cgroups.place(w2.pid, second)
    a = agent("--max-tracked-bytes", "100Mi", interval=1.0)
    wait_for(lambda: a.value("memsnap_skipped_processes", reason="memory-limit") == 1, what="one skipped")
    procs = [p for cg in (first, second) for c in a.pod(cg.pod_uid)["containers"] for p in c["processes"]]
    assert sorted(p.get("skipped", "") for p in procs) == ["", "memory-limit"]
    assert "cap" in next(p["detail"] for p in procs if p.get("skipped"))
    assert a.value("memsnap_node_tracked_bytes") <= 100 * MIB
    assert a.value("memsnap_node_tracked_bytes_limit") == 100 * MIB


def test_api_takes_a_bearer_token_when_configured(agent, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    a = agent("--token-file", str(token_file))
    assert a.get("/api/v1/pods")[0] == 401
    assert a.get("/api/v1/pods", token="wrong")[0] == 401
    assert a.get("/api/v1/pods", token="s3cret")[0] == 200
    assert a.get("/api/v1/status", token="s3cret")[0] == 200
    for open_path in ("/metrics", "/healthz", "/readyz"):
        assert a.get(open_path)[0] == 200, open_path


def test_sigterm_leaves_every_target_clean(agent, cgroups, workload):
    cg = cgroups.pod("v1-cgroupfs-containerd")
    w = workload(mib=4)
    cgroups.place(w.pid, cg)
    a = agent(interval=1.0)
    wait_for(lambda: tracked(a, cg), what="the workload tracked")
    child = int(w.send("fork 10"))  # forked after tracking began: holds a copy of the injected fd
    try:
        wait_for(lambda: (p := tracked(a, cg)) and len(p["containers"][0]["processes"]) == 2,
                 what="the forked child tracked too")
        assert a.value("memsnap_tracked_processes", **labels(cg)) == 2
        if a.pod(cg.pod_uid)["containers"][0]["processes"][0]["backend"] == "uffd-wp":
            assert leftovers(w.pid)["uffd_fds"]  # armed: so the checks below mean something
        assert a.stop(signal.SIGTERM) == 0
        assert leftovers(w.pid) == CLEAN
        assert leftovers(child) == CLEAN
        w.send("write 0 10")  # and the workload runs on
    finally:
        os.kill(child, signal.SIGKILL)


def test_sigkill_then_restart_resumes_tracking(agent, cgroups, workload):
    cg = cgroups.pod("v2-systemd-crio")
    w = workload(mib=4)
    cgroups.place(w.pid, cg)
    a = agent(interval=1.0)
    backend = wait_for(lambda: tracked(a, cg), what="the workload tracked")["containers"][0]["processes"][0]["backend"]
    a.stop(signal.SIGKILL)
    w.send("write 0 100")  # a killed agent never blocks the workload (async write-protect)

    b = agent(interval=1.0, port=a.port)
    recovered = [json.loads(line) for line in b.log.read_text().splitlines() if '"recovered"' in line]
    if backend == "uffd-wp":  # the one backend that leaves something in the target to clean
        assert [e["action"] for e in recovered] == [f"cleaned pid {w.pid} left armed by killed tracker {a.proc.pid}"]
    wait_for(lambda: tracked(b, cg), what="tracking resumed")
    cycles = b.value("memsnap_agent_cycles_total")
    w.send("write 0 500")
    wait_for(lambda: b.value("memsnap_agent_cycles_total") >= cycles + 2, what="two cycles")
    assert b.value("memsnap_dirty_pages_total", **labels(cg)) >= 500
    assert b.api("/api/v1/status")["errors"] == {}
    assert b.stop() == 0
    assert leftovers(w.pid) == CLEAN


def test_cpu_cap_sheds_sessions_and_says_why(agent, cgroups, workload):
    # A cap no agent can meet: it must shed its sessions rather than keep on regardless.
    cgs = [cgroups.pod("v1-cgroupfs-containerd") for _ in range(2)]
    for cg in cgs:
        cgroups.place(workload(mib=4).pid, cg)
    a = agent("--cpu-limit", "0.0001", interval=0.5)
    wait_for(lambda: a.value("memsnap_skipped_processes", reason="cpu-limit"), what="a process shed for CPU")
    procs = [p for cg in cgs for c in a.pod(cg.pod_uid)["containers"] for p in c["processes"]]
    shed = [p for p in procs if p.get("skipped") == "cpu-limit"]
    assert shed and "limit" in shed[0]["detail"]
    assert a.value("memsnap_agent_cpu_seconds_total") > 0
    assert a.value("memsnap_agent_cpu_limit_cores") == 0.0001


def test_logs_are_json_lines_naming_what_is_tracked(agent, cgroups, workload):
    cg = cgroups.pod("v1-cgroupfs-containerd")
    w = workload(mib=1)
    cgroups.place(w.pid, cg)
    a = agent(interval=1.0)
    wait_for(lambda: tracked(a, cg), what="the workload tracked")
    a.stop()
    entries = [json.loads(line) for line in a.log.read_text().splitlines()]
    assert {"time", "level", "logger", "msg"} <= set(entries[0])
    started = [e for e in entries if e["msg"] == "tracking" and e.get("pid") == w.pid]
    assert started and started[0]["pod_uid"] == cg.pod_uid and started[0]["container_id"] == cg.container_id
    assert entries[-1]["msg"].startswith("stopped")


def test_an_agent_inside_a_pod_never_tracks_itself(agent, cgroups):
    # In a DaemonSet the agent's own process sits in a pod cgroup like any other.
    cg = cgroups.pod("v1-cgroupfs-containerd")
    a = agent(interval=0.5)
    cgroups.place(a.proc.pid, cg)
    cycles = a.value("memsnap_agent_cycles_total")
    wait_for(lambda: a.value("memsnap_agent_cycles_total") >= cycles + 3, what="three cycles")
    assert a.pod(cg.pod_uid) is None
    assert a.api("/api/v1/status")["errors"] == {}
    assert a.get("/healthz")[0] == 200


def test_a_taken_address_is_a_one_line_error(agent):
    a = agent()
    taken = subprocess.run([*AGENT, "--listen", f"127.0.0.1:{a.port}", "--kubeconfig", "none",
                            "--log-format", "text"], capture_output=True, text=True, timeout=60)
    assert taken.returncode == 1
    assert f"cannot listen on 127.0.0.1:{a.port}" in taken.stderr.splitlines()[-1]
    assert "recovered" not in taken.stderr and "tracking" not in taken.stderr  # it did nothing else
    assert a.get("/healthz")[0] == 200  # the running agent is unharmed


def test_a_process_that_cannot_be_tracked_is_reported_retried_and_unharmed(agent, cgroups, workload):
    # Its seccomp filter refuses userfaultfd(): uffd-wp cannot inject, and must say so.
    denied, fine = cgroups.pod("v1-cgroupfs-containerd"), cgroups.pod("v2-cgroupfs-crio")
    w_denied, w_fine = workload(mib=1), workload(mib=1)
    w_denied.send("seccomp-deny userfaultfd errno")
    cgroups.place(w_denied.pid, denied)
    cgroups.place(w_fine.pid, fine)
    a = agent("--backend", "uffd-wp", interval=0.5)
    wait_for(lambda: tracked(a, fine), what="the other pod tracked")
    wait_for(lambda: a.value("memsnap_tracking_errors_total", reason="seccomp"), what="the error counted")
    proc = a.pod(denied.pod_uid)["containers"][0]["processes"][0]
    assert proc["skipped"] == "error" and "seccomp" in proc["detail"], proc
    assert a.value("memsnap_skipped_processes", reason="error") == 1
    # retried after 6 intervals, failing the same way
    wait_for(lambda: a.value("memsnap_tracking_errors_total", reason="seccomp") >= 2, timeout=15,
             what="a retry")
    w_denied.send("write 0 10")
    assert leftovers(w_denied.pid) == CLEAN


def test_exec_is_followed_and_counted(agent, cgroups, workload):
    cg = cgroups.pod("v2-systemd-crio")
    w = workload(mib=4)
    cgroups.place(w.pid, cg)
    a = agent(interval=0.5)
    wait_for(lambda: tracked(a, cg), what="the workload tracked")
    w.start("exec")
    assert json.loads(w.proc.stdout.readline())["pid"] == w.pid  # the same process, a new image
    wait_for(lambda: a.value("memsnap_vma_events_total", event="exec", **labels(cg)) == 1, what="exec counted")
    before = a.value("memsnap_dirty_pages_total", **labels(cg))
    w.send("write 0 1000")  # into the new image's region: tracked after the exec too
    wait_for(lambda: a.value("memsnap_dirty_pages_total", **labels(cg)) >= before + 1000, what="writes counted")
    assert a.value("memsnap_tracking_errors_total", reason="other") is None
