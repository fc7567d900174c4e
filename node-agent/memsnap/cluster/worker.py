"""A local node made a Kubernetes worker: containerd + runc + CNI bridge, and a kubelet.

Inside the node (a local node is already a Debian 13 root with its own namespaces and cgroups)
we add what a kubelet insists on, without touching the host: its own view of the six sysctls it
checks (files bind-mounted over /proc/sys inside the node's mount namespace, so it never writes
the host's), /dev/kmsg, a machine-id, and tmpfs for the kubelet's and containerd's state
(containerd's overlay snapshotter cannot put upper dirs on the node's overlayfs root). Pods of
node-N get 198.19.N.0/24 on the bridge cni0; nodes route each other's pod subnets directly over
memsnap0 (the host does not forward) and the host routes them to their node.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from memsnap import nodes
from memsnap.cluster import build as kbuild
from memsnap.cluster import kubeconfig, state
from memsnap.nodes import cgroups, net

CONF_DIR = "/etc/memsnap-cluster"
KUBELET = "/usr/local/bin/kubelet"
CONTAINERD_SOCK = "/run/containerd/containerd.sock"
# What the kubelet checks (and would otherwise write host-wide): kernel defaults it expects.
SYSCTLS = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
           "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
           "kernel/keys/root_maxbytes": "25000000"}
RUNTIME_HANDLER = "memsnap"
RUNC_WRAPPER = "/usr/local/sbin/memsnap-runc"
RUNC_WRAPPER_SOURCE = Path(__file__).resolve().parent.parent / "runtime" / "memsnap-runc"
STATE_TMPFS = ("/var/lib/kubelet", "/var/lib/containerd", "/var/log/pods", "/var/log/containers")


class WorkerError(RuntimeError):
    """A node component failed to start; the message names it and its log."""


@dataclass(frozen=True)
class Worker:
    name: str
    index: int
    address: str

    @property
    def pod_subnet(self) -> str:
        return state.pod_subnet(self.index)


_PREPARE = f"""
set -eu
[ -e /dev/kmsg ] || mknod -m 600 /dev/kmsg c 1 11
for d in {' '.join(STATE_TMPFS)}; do mkdir -p $d; mount -t tmpfs -o mode=755 tmpfs $d; done
mkdir -p /run/memsnap-cluster/sysctl {state.NODE_LOG_DIR} /etc/cni/net.d
while read key value; do
    f=/run/memsnap-cluster/sysctl/$(echo $key | tr / _)
    echo $value > $f
    mount --bind $f /proc/sys/$key
done <<EOF
{chr(10).join(f"{k} {v}" for k, v in SYSCTLS.items())}
EOF
[ -s /etc/machine-id ] || tr -d - < /proc/sys/kernel/random/uuid > /etc/machine-id
"""


def _containerd_config() -> str:
    return f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{CONTAINERD_SOCK}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{kbuild.PAUSE_IMAGE}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    # RuntimeClass memsnap: pods restored from a migration (docs/cluster.md, "memsnap-runc").
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNTIME_HANDLER}]
      runtime_type = "io.containerd.runc.v2"
      pod_annotations = ["memsnap.io/*"]
      container_annotations = ["io.kubernetes.container.restartCount"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNTIME_HANDLER}.options]
        BinaryName = "{RUNC_WRAPPER}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
"""


def _cni_config(w: Worker) -> str:
    return json.dumps({
        "cniVersion": "0.4.0", "name": "memsnap-pods",
        "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                     "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam",
                              "ranges": [[{"subnet": w.pod_subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}}],
    }, indent=2)


def _kubelet_config(w: Worker) -> str:
    # JSON is YAML: the kubelet reads it as its config file.
    return json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": w.address, "port": 10250, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
        "cgroupDriver": "cgroupfs", "cgroupRoot": "/",  # the node's cgroup namespace root
        "failSwapOn": False, "protectKernelDefaults": False,
        "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE here: it may not lower oom_score_adj
        "evictionHard": {"memory.available": "0%", "nodefs.available": "0%", "nodefs.inodesFree": "0%",
                         "imagefs.available": "0%"},
        "imageGCHighThresholdPercent": 100,
        # The API server calls kubelets without a client certificate (logs, exec); the port is only
        # on memsnap0, reachable from the host and the nodes.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "resolvConf": "", "maxPods": 30, "serializeImagePulls": False,
        "nodeLeaseDurationSeconds": 12, "nodeStatusUpdateFrequency": "4s",
    }, indent=2)


def _write(name: str, path: str, text: str) -> None:
    nodes.run(name, ["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path],
              input=text, text=True, check=True, stdout=subprocess.DEVNULL)


def _start_daemon(name: str, component: str, argv: list[str]) -> None:
    """Start argv detached inside the node (reparented to the node's init), output to its log."""
    log = f"{state.NODE_LOG_DIR}/{component}.log"
    script = 'log=$1; shift; setsid "$@" </dev/null >>"$log" 2>&1 &'
    nodes.run(name, ["sh", "-c", script, "sh", log, *argv], check=True)


def setup(w: Worker, b: kbuild.Build, token: str) -> None:
    """Prepare the node and start containerd (with the pause image) and the kubelet."""
    nodes.run(w.name, ["sh", "-c", _PREPARE], check=True, capture_output=True, text=True)
    nodes.copy_in(b.bin("kubelet"), w.name, KUBELET)
    nodes.copy_in(RUNC_WRAPPER_SOURCE, w.name, RUNC_WRAPPER)
    _write(w.name, f"{CONF_DIR}/containerd.toml", _containerd_config())
    _write(w.name, "/etc/cni/net.d/10-memsnap.conflist", _cni_config(w))
    _write(w.name, f"{CONF_DIR}/kubelet.yaml", _kubelet_config(w))
    kcfg = kubeconfig.write(state.DATA_DIR / f"kubelet-{w.name}.kubeconfig", *[kubeconfig.kubelet_identity(w.name)[0], token])
    nodes.copy_in(kcfg, w.name, f"{CONF_DIR}/kubelet.kubeconfig")
    _start_daemon(w.name, "containerd", ["containerd", "--config", f"{CONF_DIR}/containerd.toml"])
    _wait_socket(w)
    import_image(w.name, b.write_pause_image(state.DATA_DIR / "pause.tar"))
    _start_daemon(w.name, "kubelet", [
        KUBELET, "--container-runtime=remote", f"--container-runtime-endpoint=unix://{CONTAINERD_SOCK}",
        f"--hostname-override={w.name}", f"--node-ip={w.address}", f"--config={CONF_DIR}/kubelet.yaml",
        f"--kubeconfig={CONF_DIR}/kubelet.kubeconfig", "--v=1"])


def _wait_socket(w: Worker, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while nodes.run(w.name, ["test", "-S", CONTAINERD_SOCK]).returncode != 0:
        if "containerd" not in daemons(w.name) or time.monotonic() > deadline:
            log = state.node_log(w.name, "containerd")
            raise WorkerError(f"containerd on {w.name} did not start; log: {log}\n{state.log_tail(log)}")
        time.sleep(0.2)


def import_image(name: str, archive: Path) -> list[str]:
    """Import a docker-archive or OCI-layout tarball into the node's k8s.io namespace; returns its names."""
    inside = f"/tmp/memsnap-import-{archive.name}"
    nodes.copy_in(archive, name, inside)
    try:
        proc = nodes.run(name, ["ctr", "-n", "k8s.io", "images", "import", "--snapshotter", "overlayfs", inside],
                         capture_output=True, text=True)
    finally:
        nodes.run(name, ["rm", "-f", inside])
    if proc.returncode:
        raise WorkerError(f"ctr images import on {name} failed: {(proc.stderr or proc.stdout).strip()}")
    return [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("unpacking ")]


def daemons(name: str) -> dict[str, int]:
    """component -> host pid, for containerd and kubelet running in the node."""
    found = {}
    for pid in cgroups.pids(name):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if comm in ("containerd", "kubelet"):
            found[comm] = pid
    return found


def route(workers: list[Worker]) -> None:
    """Each node reaches the other nodes' pods directly; the host reaches every node's pods."""
    for w in workers:
        for other in workers:
            if other is not w:
                nodes.run(w.name, ["ip", "route", "replace", other.pod_subnet, "via", other.address],
                          check=True, capture_output=True)
        subprocess.run(["ip", "route", "replace", w.pod_subnet, "via", w.address, "dev", net.BRIDGE],
                       check=True, capture_output=True)


def unroute(indexes: list[int]) -> None:
    for i in indexes:
        subprocess.run(["ip", "route", "del", state.pod_subnet(i)], capture_output=True)


def route_kubernetes_service(workers: list[Worker], cluster_ip: str, port: int = 443) -> None:
    """No kube-proxy here: each node DNATs the `kubernetes` Service (what in-cluster clients find in
    KUBERNETES_SERVICE_HOST/PORT) to the API server, for host-network processes (OUTPUT) and pods
    (PREROUTING). The API server's certificate names that ClusterIP too."""
    rule = ["-d", f"{cluster_ip}/32", "-p", "tcp", "--dport", str(port),
            "-j", "DNAT", "--to-destination", f"{state.API_ADDRESS}:{state.API_PORT}"]
    for w in workers:
        for chain in ("OUTPUT", "PREROUTING"):
            proc = nodes.run(w.name, ["iptables", "-w", "-t", "nat", "-A", chain, *rule],
                             capture_output=True, text=True)
            if proc.returncode:
                raise WorkerError(f"iptables DNAT for the kubernetes Service on {w.name}: {proc.stderr.strip()}")
