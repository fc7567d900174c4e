"""A pod's container migrated by the agents between the real kubelets of `memsnap cluster`:
the target pod (RuntimeClass memsnap, annotation memsnap.io/restore-from) gets the restored
container from memsnap-runc; kubectl and the agents' API only (no operator)."""
from __future__ import annotations

import subprocess
import time

import pytest

from memsnap.nodes import runtime

from migration.conftest import CRAWL, UNCRAWL

from .conftest import counter_pod, lines, new_id, target_pod

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SOURCE, TARGET = "node-1", "node-2"


def _start_source(kubectl, pods, name: str, mib: int = 64) -> tuple[dict, object]:
    manifest = counter_pod(name, SOURCE, mib)
    kubectl.apply(manifest)
    pods.append(name)
    pod = kubectl.pod_running(name)
    first = kubectl.wait_for(lambda: lines(kubectl, name)[-1:] or None, f"{name} counting")[0]
    return pod, first


def _migrate(agent_api, pod: dict, mig_id: str, target_name: str) -> tuple[int, dict]:
    body = {"pod": {"namespace": "default", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]},
            "id": mig_id, "to": TARGET, "targetPod": {"namespace": "default", "name": target_name}}
    return agent_api.call(SOURCE, "POST", "/api/v1/migrations", body)


def _wait_phase(kubectl, agent_api, mig_id: str, phases: tuple[str, ...], timeout: float = 180) -> dict:
    def reached():
        status, st = agent_api.call(SOURCE, "GET", f"/api/v1/migrations/{mig_id}")
        assert status == 200, st
        return st if st["phase"] in phases else None
    return kubectl.wait_for(reached, f"migration {mig_id} to reach {phases}", timeout)


def _incoming_exists(mig_id: str) -> bool:
    return runtime.run(TARGET, ["test", "-e", f"/var/lib/memsnap/incoming/{mig_id}"]).returncode == 0


def _restarts(kubectl, name: str) -> int:
    return kubectl.json("get", "pod", name)["status"]["containerStatuses"][0]["restartCount"]


def _scratch(node: str, uid: str) -> str:
    return f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/scratch"


def _move(kubectl, agent_api, pods, pod: dict, last):
    """The whole hand-over as the operator drives it: migrate, target pod, HandedOver, the source
    pod deleted, complete. Returns the Completed status and last(source) just before the delete."""
    name = pod["metadata"]["name"]
    mig_id = new_id()
    status, started = _migrate(agent_api, pod, mig_id, f"{name}-2")
    assert status == 202, started
    kubectl.apply(target_pod(kubectl.json("get", "pod", name), f"{name}-2", TARGET, mig_id))
    pods.append(f"{name}-2")
    st = _wait_phase(kubectl, agent_api, mig_id, ("HandedOver", "RolledBack", "Failed"))
    assert st["phase"] == "HandedOver", st["message"]
    before = last(name)
    kubectl("delete", "pod", name, "--grace-period=0", "--force")
    status, done = agent_api.call(SOURCE, "POST", f"/api/v1/migrations/{mig_id}/complete")
    assert status == 200 and done["phase"] == "Completed", done
    return done, before


def test_pod_moves_to_another_node_with_its_memory(kubectl, counter_image, runtime_class, agent_api, pods):
    pod, first = _start_source(kubectl, pods, "pm-move")
    note = f"written on {SOURCE} before the move\n"
    runtime.run(SOURCE, ["sh", "-c", 'mkdir -p "$1/sub" && printf %s "$2" > "$1/sub/note"', "sh",
                         _scratch(SOURCE, pod["metadata"]["uid"]), note], check=True)
    done, before = _move(kubectl, agent_api, pods, pod, lambda name: lines(kubectl, name)[-1])
    assert done["downtimeMs"] > 0 and done["sourceNode"] == SOURCE and done["targetNode"] == TARGET
    # The container ran before its pre-copied memory was read: the restore left it to the fill.
    assert done["lazyBytes"] >= 32 << 20 and done["fillSeconds"] is not None, done

    moved = kubectl.pod_running("pm-move-2")
    assert moved["spec"]["nodeName"] == TARGET and _restarts(kubectl, "pm-move-2") == 0
    after = kubectl.wait_for(lambda: [x for x in lines(kubectl, "pm-move-2") if x.count > before.count + 50] or None,
                             "the restored counter to go on")[-1]
    assert (after.token, after.sum) == (first.token, first.sum)  # same process, memory exact
    assert "start token" not in kubectl("logs", "pm-move-2").stdout  # restored, not started
    assert not _incoming_exists(done["id"])
    moved_note = runtime.run(TARGET, ["cat", _scratch(TARGET, moved["metadata"]["uid"]) + "/sub/note"],
                             capture_output=True, text=True)
    assert moved_note.stdout == note, moved_note.stderr  # the emptyDir came along
    kubectl.wait_for(lambda: not [p for p in runtime.list_nodes() if p.name == SOURCE] or
                     _no_counter_on(SOURCE), "the source's processes to be gone", timeout=60)
    print(f"pause felt by the workload: {after.maxgap_ms} ms; agent's downtime {done['downtimeMs']} ms; {done['finalImages']}; "
          f"phases {done.get('pausePhases')}; filled {done['lazyBytes'] >> 20} MiB in {done['fillSeconds']} s")


def _no_counter_on(node: str) -> bool:
    proc = runtime.run(node, ["sh", "-c", "for p in /proc/[0-9]*; do cat $p/comm 2>/dev/null; done"],
                       capture_output=True, text=True)
    return "counter" not in proc.stdout.split()


def test_a_failed_restore_rolls_back(kubectl, counter_image, runtime_class, agent_api, pods):
    pod, first = _start_source(kubectl, pods, "pm-fail", mib=16)
    mig_id = new_id()
    status, started = _migrate(agent_api, pod, mig_id, "pm-fail-2")
    assert status == 202, started
    # A target whose container has another root file system (busybox: no /counter): CRIU cannot restore.
    broken = target_pod(kubectl.json("get", "pod", "pm-fail"), "pm-fail-2", TARGET, mig_id)
    broken["spec"]["containers"][0]["image"] = "memsnap.local/busybox:1"
    broken["spec"]["containers"][0]["command"] = ["sleep", "1000"]
    kubectl.apply(broken)
    pods.append("pm-fail-2")
    st = _wait_phase(kubectl, agent_api, mig_id, ("HandedOver", "RolledBack", "Failed"))
    assert st["phase"] == "RolledBack", st["message"]
    assert "counter" in st["message"] and "restor" in st["message"], st["message"]
    _assert_runs_on(kubectl, "pm-fail", first)
    assert not _incoming_exists(mig_id)


# On the target node: catch the agent's lazy-pages daemon for migration argv[1] as it starts,
# slow it to a crawl (a cpu cgroup of its own: 2 ms per 250 ms; the restore still gets what it
# needs from it, and the restored container then waits on its pre-copied pages), and kill it
# once the wrapper has restored the container: the fill fails after the container ran.
KILL_THE_FILL = r"""
import glob, os, signal, sys, time
base = b"/var/lib/memsnap/incoming/" + sys.argv[1].encode()
deadline, pid, quota = time.monotonic() + 120, None, 2000
while pid is None:
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"criu") and b"lazy-pages" in argv and any(a.startswith(base) for a in argv):
            pid = int(p)
            break
    if time.monotonic() > deadline:
        sys.exit("no lazy-pages daemon came")
""" + CRAWL + r"""
print("slowed", pid, flush=True)
while not glob.glob(base.decode() + "/*/.result.json"):
    if time.monotonic() > deadline:
        sys.exit("the container was not restored")
    time.sleep(0.01)
os.kill(pid, signal.SIGKILL)
print("killed", pid, flush=True)
""" + UNCRAWL


def test_a_failed_background_fill_rolls_back(kubectl, counter_image, runtime_class, agent_api, pods):
    """The target's container runs before its memory is in; if the fill then fails, the copy
    there is killed (it would read zeros) and the pod runs on where it was, memory exact."""
    pod, first = _start_source(kubectl, pods, "pm-fill")
    mig_id = new_id()
    killer = runtime.popen(TARGET, ["python3", "-c", KILL_THE_FILL, mig_id], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        status, started = _migrate(agent_api, pod, mig_id, "pm-fill-2")
        assert status == 202, started
        kubectl.apply(target_pod(kubectl.json("get", "pod", "pm-fill"), "pm-fill-2", TARGET, mig_id))
        pods.append("pm-fill-2")
        st = _wait_phase(kubectl, agent_api, mig_id, ("HandedOver", "RolledBack", "Failed"))
    finally:
        try:
            out, err = killer.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            killer.kill()
            out, err = killer.communicate()
    assert "killed" in out, (out, err, st)
    assert st["phase"] == "RolledBack" and "background fill" in st["message"], st
    _assert_runs_on(kubectl, "pm-fill", first)
    assert not _incoming_exists(mig_id)


@pytest.mark.parametrize("when", ["PreCopying", "Restoring"])
def test_delete_mid_migration_rolls_back(kubectl, counter_image, runtime_class, agent_api, pods, when):
    """DELETE while pre-copy runs (a slow link: 8 MiB/s for 64 MiB), or while the source is
    frozen waiting for a target pod that never comes."""
    name = f"pm-abort-{when.lower()}"
    pod, first = _start_source(kubectl, pods, name, mib=64 if when == "PreCopying" else 16)
    mig_id = new_id()
    body = {"pod": {"namespace": "default", "name": name, "uid": pod["metadata"]["uid"]}, "id": mig_id, "to": TARGET,
            "targetPod": {"namespace": "default", "name": name + "-2"}}
    if when == "PreCopying":
        body["bandwidth"] = 8
    status, _ = agent_api.call(SOURCE, "POST", "/api/v1/migrations", body)
    assert status == 202
    kubectl.wait_for(lambda: _incoming_exists(mig_id) or None, "the target to hear of the migration")
    _wait_phase(kubectl, agent_api, mig_id, (when,))
    time.sleep(1.0)
    status, st = agent_api.call(SOURCE, "DELETE", f"/api/v1/migrations/{mig_id}")
    assert status == 200 and st["phase"] == "RolledBack", st
    assert "cancelled" in st["message"]
    status, again = agent_api.call(SOURCE, "DELETE", f"/api/v1/migrations/{mig_id}")
    assert status == 200 and again["phase"] == "RolledBack"
    _assert_runs_on(kubectl, name, first)
    assert not _incoming_exists(mig_id)


def _assert_runs_on(kubectl, name: str, first) -> None:
    """Still running where it was, never restarted, counting on with the same memory."""
    seen = lines(kubectl, name)[-1]
    time.sleep(2.5)
    now = lines(kubectl, name)[-1]
    assert kubectl.json("get", "pod", name)["status"]["phase"] == "Running"
    assert _restarts(kubectl, name) == 0
    assert (now.token, now.sum) == (first.token, first.sum) and now.count > seen.count


def test_unknown_pod_and_id_are_refused(kubectl, agent_api):
    body = {"pod": {"namespace": "default", "name": "no-such-pod", "uid": "0000-none"}, "id": new_id(), "to": TARGET}
    status, answer = agent_api.call(SOURCE, "POST", "/api/v1/migrations", body)
    assert status == 404 and "no pod default/no-such-pod" in answer["error"], answer
    status, answer = agent_api.call(SOURCE, "GET", "/api/v1/migrations/nothing-here")
    assert status == 404 and "no migration nothing-here" in answer["error"]
    status, answer = agent_api.call(SOURCE, "DELETE", "/api/v1/migrations/nothing-here")
    assert status == 404


def test_a_pod_with_two_containers_moves_in_one_pause(kubectl, counter_image, runtime_class, agent_api, pods):
    manifest = counter_pod("pm-duo", SOURCE, 16)
    second = dict(manifest["spec"]["containers"][0], name="second", args=["8"])
    manifest["spec"]["containers"].append(second)
    kubectl.apply(manifest)
    pods.append("pm-duo")
    pod = kubectl.pod_running("pm-duo")

    def both(name):
        def counting():
            got = {c: _lines_of(kubectl, name, c) for c in ("counter", "second")}
            return got if all(got.values()) else None
        return counting
    first = kubectl.wait_for(both("pm-duo"), "both containers counting")
    mig_id = new_id()
    status, started = _migrate(agent_api, pod, mig_id, "pm-duo-2")
    assert status == 202 and sorted(started["containers"]) == ["counter", "second"], started
    kubectl.apply(target_pod(kubectl.json("get", "pod", "pm-duo"), "pm-duo-2", TARGET, mig_id))
    pods.append("pm-duo-2")
    st = _wait_phase(kubectl, agent_api, mig_id, ("HandedOver", "RolledBack", "Failed"))
    assert st["phase"] == "HandedOver", st["message"]
    kubectl("delete", "pod", "pm-duo", "--grace-period=0", "--force")
    status, done = agent_api.call(SOURCE, "POST", f"/api/v1/migrations/{mig_id}/complete")
    assert status == 200 and done["phase"] == "Completed", done
    after = kubectl.wait_for(both("pm-duo-2"), "both restored containers counting")
    moved = kubectl.json("get", "pod", "pm-duo-2")
    assert [s["restartCount"] for s in moved["status"]["containerStatuses"]] == [0, 0]
    for c in ("counter", "second"):
        assert (after[c][-1].token, after[c][-1].sum) == (first[c][-1].token, first[c][-1].sum), c


def _lines_of(kubectl, pod: str, container: str):
    from .conftest import LINE, Line
    out = kubectl("logs", pod, "-c", container, check=False).stdout
    return [Line(m[1], int(m[2]), m[3], float(m[4])) for m in map(LINE.match, out.splitlines()) if m]


SHELL_LOOP = ('read token < /proc/sys/kernel/random/uuid; i=0; echo "start $token"; '
              'while true; do i=$((i+1)); echo "tick $token $i"; sleep 0.1 & wait $!; done')


def _ticks(kubectl, name: str) -> list[tuple[str, int]]:
    out = kubectl("logs", name, check=False).stdout
    return [(w[1], int(w[2])) for w in (line.split() for line in out.splitlines()) if len(w) == 3 and w[0] == "tick"]


def _shell_on(node: str, marker: str) -> bool:
    proc = runtime.run(node, ["sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"],
                       capture_output=True, text=True)
    return marker in proc.stdout


def test_a_shell_loop_forking_children_moves(kubectl, runtime_class, agent_api, pods):
    """A busybox shell whose loop forks a `sleep` every 0.1 s: tasks come and go between the
    pre-copy rounds; the shell's variables (a token and a counter) must come along."""
    marker = "pm-shell-loop-" + new_id()[:8]  # $0 of the shell: finds its process on a node
    manifest = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "pm-shell", "namespace": "default", "labels": {"app": "pm-shell"}},
                "spec": {"nodeName": SOURCE, "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "loop", "image": "memsnap.local/busybox:1",
                                         "imagePullPolicy": "Never",
                                         "command": ["sh", "-c", SHELL_LOOP, marker]}]}}
    kubectl.apply(manifest)
    pods.append("pm-shell")
    pod = kubectl.pod_running("pm-shell")
    token = kubectl.wait_for(lambda: [t for t in _ticks(kubectl, "pm-shell") if t[1] >= 5] or None,
                             "the shell loop ticking")[0][0]
    done, before = _move(kubectl, agent_api, pods, pod, lambda name: _ticks(kubectl, name)[-1])

    moved = kubectl.pod_running("pm-shell-2")
    assert moved["spec"]["nodeName"] == TARGET and _restarts(kubectl, "pm-shell-2") == 0
    after = kubectl.wait_for(lambda: [t for t in _ticks(kubectl, "pm-shell-2") if t[1] > before[1] + 20] or None,
                             "the restored shell loop to go on")
    assert {t[0] for t in _ticks(kubectl, "pm-shell-2")} == {token}  # the same shell: its variables came along
    first_here = _ticks(kubectl, "pm-shell-2")[0][1]
    assert before[1] - 5 <= first_here <= before[1] + 5, (before, first_here)  # counting on, not from 1
    assert "start" not in kubectl("logs", "pm-shell-2").stdout  # restored, not started
    assert kubectl.json("get", "pod", "pm-shell-2")["status"]["phase"] == "Running"
    assert not _incoming_exists(done["id"])
    kubectl.wait_for(lambda: not _shell_on(SOURCE, marker) or None, "the source's shell to be gone", timeout=60)
    assert _shell_on(TARGET, marker)
    print(f"shell loop moved at tick {before[1]} -> {after[-1][1]}; {done['finalImages']}; "
          f"downtime {done['downtimeMs']} ms")
