"""A pod's containers as containerd and runc hold them on this node, and running the node's own
runc where it must run: in the node's mount namespace.

containerd's runc shim keeps a bundle per running task in TASKS/<id>/ (config.json with the CRI
annotations, init.pid); runc's state for the k8s.io namespace is under RUNC_ROOT. Reading those
needs no containerd client and works the same for an agent in a DaemonSet container, which mounts
/run/containerd at the same path and shares the node's pid namespace (hostPID).
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import cgroupfs
from ..checkpoint import freezer as chain_freezer

TASKS = Path("/run/containerd/io.containerd.runtime.v2.task/k8s.io")
RUNC_ROOT = "/run/containerd/runc/k8s.io"
RUNC = "/usr/sbin/runc"
KUBELET_PODS = "/var/lib/kubelet/pods"
EMPTY_DIRS = "volumes/kubernetes.io~empty-dir"
EMPTY_DIR_ARCHIVE = "emptydir.tar"  # in the first container's final image; memsnap-runc unpacks it
A_TYPE = "io.kubernetes.cri.container-type"
A_NAME = "io.kubernetes.cri.container-name"
A_SANDBOX = "io.kubernetes.cri.sandbox-id"
A_UID = "io.kubernetes.cri.sandbox-uid"


class PodRuntimeError(Exception):
    """The pod or its containers cannot be found or handled on this node; the message says why."""


@dataclass(frozen=True)
class PodContainer:
    id: str  # containerd's (and runc's) container id
    name: str  # the pod spec's container name
    pid: int  # its init, as this node's pid namespace sees it
    bundle: Path


def node_command(argv: list[str]) -> list[str]:
    """argv run in the node's mount namespace: as is when the agent already is there (a local
    node, a host service), through nsenter into pid 1's when it runs in a container (hostPID)."""
    try:
        same = os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        same = True
    return argv if same else ["nsenter", "--target", "1", "--mount", "--", *argv]


def run_node(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(node_command(argv), capture_output=True, text=True, timeout=timeout)


def _bundles() -> list[tuple[Path, dict]]:
    found = []
    try:
        entries = sorted(TASKS.iterdir())
    except FileNotFoundError:
        return found
    for d in entries:
        try:
            found.append((d, json.loads((d / "config.json").read_text()).get("annotations") or {}))
        except (OSError, ValueError):
            continue  # a task being created or deleted
    return found


def app_containers(uid: str) -> list[PodContainer]:
    """The running app containers (not the sandbox) of pod uid on this node, by name."""
    bundles = _bundles()
    sandboxes = {d.name for d, a in bundles if a.get(A_TYPE) == "sandbox" and a.get(A_UID) == uid}
    found = []
    for d, a in bundles:
        if a.get(A_TYPE) == "container" and a.get(A_SANDBOX) in sandboxes:
            try:
                pid = int((d / "init.pid").read_text())
            except (OSError, ValueError):
                continue  # not started (or gone): nothing runs to migrate
            found.append(PodContainer(d.name, a.get(A_NAME, d.name), pid, d))
    return sorted(found, key=lambda c: c.name)


def freezer(c: PodContainer) -> cgroupfs.Freezer:
    """The container's own freezer cgroup. Frozen before `runc checkpoint`, it stays frozen after
    a --leave-running dump: CRIU notes that the cgroup was frozen when it began and freezes it
    again before it lets the tasks go (criu/seize.c, freezer_restore_state). A frozen parent
    (the pod's cgroup) would not do: CRIU thaws the container's cgroup to stop the tasks with
    ptrace, which a frozen parent prevents (CRIU times out on unseizable tasks)."""
    try:
        return chain_freezer.of(c.pid)
    except chain_freezer.FreezeError as exc:
        raise PodRuntimeError(f"container {c.name} has no freezer cgroup on this node ({exc})") from None


def container_cgroups(c: PodContainer) -> list[Path]:
    """The container's cgroup in every mounted hierarchy (to kill what runs in it)."""
    member = cgroupfs.membership(c.pid)
    return [mount / member[k].lstrip("/") for k, mount in cgroupfs.hierarchies().items() if k in member]


def checkpoint(c: PodContainer, image: Path, work: Path, parent: Path | None,
               criu_options: list[str] = (), timeout: float = 300.0) -> None:
    """`runc checkpoint --leave-running` of the container into image (runc's checkpoint shape:
    descriptors.json, external mounts keyed by destination, the pod's netns external), against
    a parent image directory if given. criu_options reach CRIU through runc's CRIU configuration
    file, /etc/criu/runc.conf, which exists only for this call: runc runs in a private mount
    namespace (a copy of the node's) with a tmpfs on /etc/criu holding it."""
    argv = [RUNC, "--root", RUNC_ROOT, "checkpoint", "--leave-running", "--image-path", str(image),
            "--work-path", str(work)]
    if parent is not None:
        argv += ["--parent-path", os.path.relpath(parent, image)]
    argv.append(c.id)
    if criu_options:
        conf = "\n".join(criu_options) + "\n"
        script = ('mkdir -p /etc/criu && mount -t tmpfs -o mode=0700 memsnap-criu /etc/criu && '
                  'printf %s "$1" > /etc/criu/runc.conf && shift && exec "$@"')
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", conf, *argv]
    proc = run_node(argv, timeout)
    if proc.returncode != 0:
        raise PodRuntimeError(f"runc checkpoint of container {c.name} failed: {proc.stderr.strip()[-300:]}"
                              f"{_log_tail(work / 'dump.log')}")


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        errors = [ln for ln in path.read_text(errors="replace").splitlines() if "Error" in ln]
    except OSError:
        return ""
    return ("; CRIU: " + " | ".join(errors[-lines:])) if errors else ""


def pack_empty_dirs(uid: str, archive: Path, timeout: float = 300.0) -> bool:
    """The pod's emptyDir volumes (every one, by volume name) as a tar archive; False when the
    pod has none. Read in the node's mount namespace, where the kubelet keeps them."""
    script = '[ -d "$1" ] && [ -n "$(ls -A "$1")" ] || exit 3; exec tar -C "$1" -cf "$2" .'
    proc = run_node(["sh", "-c", script, "sh", f"{KUBELET_PODS}/{uid}/{EMPTY_DIRS}", str(archive)], timeout)
    if proc.returncode == 3:
        return False
    if proc.returncode != 0:
        raise PodRuntimeError(f"cannot pack the pod's emptyDir volumes: {proc.stderr.strip()[-300:]}")
    return True
