"""Processes are mapped to their pod and container from /proc/*/cgroup, for both kubelet cgroup
drivers, containerd and CRI-O naming, cgroup v1 and v2: first as pure parsing, then with real
processes placed in real cgroups."""
from __future__ import annotations

import os
import signal

import pytest

from memsnap.agent.discovery import PodCgroup, parse_cgroup_path, parse_proc_cgroup, scan

from .conftest import layouts

UID = "8f2b9a3e-1c4d-4e5f-9a7b-0c1d2e3f4a5b"
UID_ = UID.replace("-", "_")
CID = "3" * 40 + "abcdef0123456789abcdef01"
assert len(CID) == 64


@pytest.mark.parametrize("path, expected", [
    # cgroupfs driver: containerd names the container cgroup by its bare ID, CRI-O with crio-
    (f"/kubepods/burstable/pod{UID}/{CID}", PodCgroup(UID, CID, "containerd", "burstable", "cgroupfs")),
    (f"/kubepods/besteffort/pod{UID}/crio-{CID}", PodCgroup(UID, CID, "crio", "besteffort", "cgroupfs")),
    (f"/kubepods/pod{UID}/{CID}", PodCgroup(UID, CID, "containerd", "guaranteed", "cgroupfs")),
    # systemd driver: slices with the UID's dashes escaped as underscores, scopes per container
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, CID, "containerd", "burstable", "systemd")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope",
     PodCgroup(UID, CID, "crio", "guaranteed", "systemd")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope",
     PodCgroup(UID, CID, "docker", "besteffort", "systemd")),
    # nested under another runtime's cgroup (kind, a node in a container)
    (f"/docker/{'e' * 64}/kubepods/burstable/pod{UID}/{CID}",
     PodCgroup(UID, CID, "containerd", "burstable", "cgroupfs")),
    # seen from an agent in a pod with its own cgroup namespace: relative to the agent's cgroup
    (f"/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
     PodCgroup(UID, CID, "containerd", "besteffort", "systemd")),
    (f"/../../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope",
     PodCgroup(UID, CID, "crio", "burstable", "systemd")),
    (f"/../../pod{UID}/{CID}", PodCgroup(UID, CID, "containerd", "guaranteed", "cgroupfs")),
    # a process in the pod's cgroup but in no container's
    (f"/kubepods/burstable/pod{UID}", PodCgroup(UID, "", "", "burstable", "cgroupfs")),
    # static pods: the UID is a 32-hex config hash
    ("/kubepods/burstable/pod" + "a" * 32 + "/" + CID, PodCgroup("a" * 32, CID, "containerd", "burstable")),
    # not pods
    ("/", None),
    ("/user.slice/user-0.slice/session-1.scope", None),
    ("/kubepods/burstable", None),
    ("/kubepods.slice/kubepods-burstable.slice", None),
    (f"/system.slice/pod{UID}/{CID}", None),  # a pod-like name outside kubelet's tree
    # CRI-O's conmon monitors a container from its own scope: not the workload
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope", None),
])
def test_parse_cgroup_path(path, expected):
    assert parse_cgroup_path(path) == expected


def test_hybrid_host_takes_the_hierarchy_that_holds_the_pod():
    v1_only = f"12:memory:/kubepods/pod{UID}/{CID}\n4:cpu,cpuacct:/kubepods/pod{UID}/{CID}\n0::/\n"
    assert parse_proc_cgroup(v1_only) == (PodCgroup(UID, CID, "containerd"), "memory")
    v2_only = f"4:memory:/process_api/x\n1:name=systemd:/\n0::/kubepods/pod{UID}/crio-{CID}\n"
    assert parse_proc_cgroup(v2_only) == (PodCgroup(UID, CID, "crio"), "v2")
    assert parse_proc_cgroup("4:memory:/\n0::/user.slice\n") is None


@pytest.mark.parametrize("layout", list(layouts()))
def test_real_processes_in_real_pod_cgroups(layout, cgroups, workload):
    cg = cgroups.pod(layout)
    inside, outside = workload(mib=1), workload(mib=1)
    cgroups.place(inside.pid, cg)

    pods = scan()
    assert cg.pod_uid in pods
    containers = pods[cg.pod_uid].containers
    assert list(containers) == [cg.container_id]
    assert [p.pid for p in containers[cg.container_id].processes] == [inside.pid]
    expected_hierarchy = "v2" if layout.startswith("v2") else "memory"
    assert containers[cg.container_id].processes[0].hierarchy == expected_hierarchy
    assert all(p.pid != outside.pid for pod in pods.values() for c in pod.containers.values()
               for p in c.processes)

    inside.stop()
    assert cg.pod_uid not in scan()


def test_children_of_a_container_process_belong_to_it(cgroups, workload):
    cg = cgroups.pod("v1-cgroupfs-containerd")
    w = workload(mib=1)
    cgroups.place(w.pid, cg)
    child = int(w.send("fork 1"))  # a forked child starts in its parent's cgroup
    try:
        procs = scan()[cg.pod_uid].containers[cg.container_id].processes
        assert sorted(p.pid for p in procs) == sorted([w.pid, child])
    finally:
        os.kill(child, signal.SIGKILL)  # the workload's exit reaps it
