"""Which processes belong to which pod and container, read from /proc/*/cgroup.

kubelet names pod cgroups after the pod UID and the runtime names container cgroups after
the container ID. The two cgroup drivers spell them differently:

    cgroupfs  /kubepods/burstable/pod<uid>/<id>                     (containerd)
              /kubepods/pod<uid>/crio-<id>                          (CRI-O, guaranteed QoS)
    systemd   /kubepods.slice/kubepods-besteffort.slice/
                  kubepods-besteffort-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
                                                                    (or crio-<id>.scope)

A line of /proc/PID/cgroup is "N:controllers:path" for cgroup v1 and "0::path" for v2; on a
hybrid host the same process has both, and kubelet may use either, so every line is tried
(v2 first, then the v1 controllers kubelet always enables). Paths may be prefixed by a
nested runtime's cgroup (kind) or be relative to the agent's own cgroup namespace ("/../.."),
so the pod segment is searched anywhere below kubelet's root.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# pod UIDs are UUIDs (static pods: a 32-hex config hash); systemd escapes '-' as '_'
_POD = re.compile(r"^(?:kubepods-(?:[a-z]+-)?)?pod([0-9a-fA-F][0-9a-fA-F_-]{31,35})(?:\.slice)?$")
# a container segment: optional runtime prefix, 64 hex digits, optional .scope
_CONTAINER = re.compile(r"^(?:(cri-containerd|crio|docker|containerd)-)?([0-9a-f]{64})(?:\.scope)?$")
_QOS = {"burstable", "besteffort"}
#: cgroup v1 controllers tried after v2, in order (kubelet creates pod cgroups in all of them)
V1_ORDER = ("memory", "cpu,cpuacct", "cpu", "pids", "name=systemd", "freezer", "cpuset")


@dataclass(frozen=True)
class PodCgroup:
    """Where a cgroup path places a process: its pod, and its container when in one."""

    pod_uid: str
    container_id: str = ""  # "" for a process in the pod's cgroup but no container's
    runtime: str = ""  # containerd, crio, docker, or "" when the path does not say
    qos: str = "guaranteed"
    driver: str = "cgroupfs"  # or systemd


def parse_cgroup_path(path: str) -> PodCgroup | None:
    """The pod (and container) a cgroup path belongs to, or None outside any pod."""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        m = _POD.match(part)
        if not m or not (_under_kubepods(parts[:i]) or part.startswith("kubepods-")):
            continue
        uid = m.group(1).replace("_", "-").lower()
        driver = "systemd" if part.endswith(".slice") else "cgroupfs"
        qos = _qos(parts[:i + 1])
        cid, runtime = "", ""
        if i + 1 < len(parts):
            c = _CONTAINER.match(parts[i + 1])
            if not c:  # e.g. crio-conmon-<id>.scope: the runtime's helper, not the workload
                return None
            cid, runtime = c.group(2), _runtime(c.group(1), driver)
        return PodCgroup(uid, cid, runtime, qos, driver)
    return None


def _under_kubepods(parents: list[str]) -> bool:
    """Under kubepods, kubepods.slice, kubepods-burstable.slice, ... (kubelet's root for pods),
    or under "..": an agent in a pod with its own cgroup namespace sees other pods' paths
    relative to its own cgroup, e.g. /../../pod<uid>/<id> for a pod of the same QoS class."""
    return any(p.startswith("kubepods") for p in parents) or parents[:1] == [".."]


def _qos(parts: list[str]) -> str:
    for p in parts:
        name = p.removesuffix(".slice").split("-")
        for q in _QOS:
            if q in name:
                return q
    return "guaranteed"


def _runtime(prefix: str | None, driver: str) -> str:
    if prefix in ("cri-containerd", "containerd"):
        return "containerd"
    if prefix in ("crio", "docker"):
        return prefix
    return "containerd" if driver == "cgroupfs" else ""  # a bare ID: containerd's cgroupfs naming


def parse_proc_cgroup(text: str) -> tuple[PodCgroup, str] | None:
    """The pod placement from the whole of /proc/PID/cgroup, with the hierarchy it came from
    ("v2" or the v1 controller list)."""
    lines: dict[str, str] = {}
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        lines["v2" if hier == "0" and controllers == "" else controllers] = path
    order = ["v2", *V1_ORDER, *sorted(lines)]
    for hierarchy in dict.fromkeys(order):
        if hierarchy in lines:
            found = parse_cgroup_path(lines[hierarchy])
            if found:
                return found, hierarchy
    return None


@dataclass(frozen=True)
class PodProcess:
    pid: int
    starttime: int
    comm: str
    cgroup: PodCgroup
    hierarchy: str


@dataclass
class Container:
    id: str
    runtime: str
    processes: list[PodProcess] = field(default_factory=list)


@dataclass
class Pod:
    uid: str
    qos: str
    driver: str
    containers: dict[str, Container] = field(default_factory=dict)


def scan(proc: str = "/proc") -> dict[str, Pod]:
    """Every pod with a live user-space process on this host, by pod UID."""
    pods: dict[str, Pod] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        found = read_process(int(name), proc)
        if found is None:
            continue
        c = found.cgroup
        pod = pods.setdefault(c.pod_uid, Pod(c.pod_uid, c.qos, c.driver))
        pod.containers.setdefault(c.container_id, Container(c.container_id, c.runtime)).processes.append(found)
    return pods


def read_process(pid: int, proc: str = "/proc") -> PodProcess | None:
    """pid's pod placement, or None outside pods, for kernel threads, zombies and the gone."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            placed = parse_proc_cgroup(f.read())
        if placed is None:
            return None
        with open(f"{proc}/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    rest = stat[stat.rindex(")") + 2:].split()
    state, flags, starttime = rest[0], int(rest[6]), int(rest[19])
    if state in ("Z", "X") or flags & 0x00200000:  # PF_KTHREAD: no memory of its own
        return None
    return PodProcess(pid, starttime, comm, placed[0], placed[1])
