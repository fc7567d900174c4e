"""memsnap installed into the local cluster by its Helm chart (charts/memsnap), as `cluster up` does.

The image is built from the checkout (images.py) and imported into every node; the chart's CA is
the host's memsnap CA (a Secret made from /var/lib/memsnap/pki), so host tools calling agents as
`admin` (memsnap.nodes.agents.client) trust and are trusted by the chart's agents. The nodes' own
agents (`memsnap nodes up` starts one in each) give way to the DaemonSet's: same address, same port.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from memsnap import nodes, pki
from memsnap.cluster import api, images, state, worker
from memsnap.cluster import build as kbuild

Log = Callable[[str], None]

RELEASE = "memsnap"
NAMESPACE = "memsnap-system"
CHART_DIR = images.CHECKOUT / "charts" / "memsnap"
CA_SECRET = "memsnap-host-ca"
AGENT_DAEMONSET = f"{RELEASE}-agent"
OPERATOR_DEPLOYMENT = f"{RELEASE}-operator"
READY_TIMEOUT = 240.0


class ChartError(RuntimeError):
    """The chart could not be installed, or what it installed did not become ready."""


def helm_binary() -> str:
    """helm beside this python (tools/setup links it into .venv/bin), else on PATH."""
    beside = Path(sys.executable).parent / "helm"
    found = str(beside) if beside.is_file() else shutil.which("helm")
    if not found:
        raise ChartError("helm not found: run tools/setup (it puts helm into .venv/bin)")
    return found


def operator_available() -> bool:
    """Whether this checkout has the `memsnap operator` command the chart's Deployment runs."""
    return importlib.util.find_spec("memsnap.commands.operator") is not None


def install(workers: list[worker.Worker], log: Log, operator: bool = True, wait_operator: bool = True) -> None:
    """Build and load the image, let the nodes' agents give way, install or upgrade the release and
    wait until an agent is Ready on every node, and the operator if it runs and wait_operator.
    The operator runs if asked and the checkout has it; otherwise only its RBAC is installed."""
    # here, not at the top: `memsnap track` (which imports the CLI's commands) runs on the
    # standard library alone, and the agents' client needs aiohttp
    from memsnap.nodes import agents as node_agents
    image = images.ensure(log)
    log(f"memsnap: loading {image.tag} into {', '.join(w.name for w in workers)}")
    for w in workers:
        worker.import_image(w.name, image.archive)
        node_agents.stop(nodes.get(w.name))
    operator = operator and operator_available()
    _apply(_ca_secret())
    values = {"image.repository": images.REPOSITORY, "image.tag": image.tag.rsplit(":", 1)[1],
              "image.id": image.image_id[:16], "tls.existingSecret": CA_SECRET,
              # Not running the operator (not asked, or no such command here): its RBAC only.
              "operator.replicas": "1" if operator else "0"}
    log(f"memsnap: helm upgrade --install {RELEASE} ({CHART_DIR}) in namespace {NAMESPACE}")
    helm("upgrade", "--install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE,
         *[arg for k, v in values.items() for arg in ("--set-string" if k.startswith("image.") else "--set",
                                                      f"{k}={v}")])
    wait_ready(len(workers), operator and wait_operator)


def helm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """helm ARGS with the admin kubeconfig; ChartError naming the command on failure."""
    proc = subprocess.run([helm_binary(), "--kubeconfig", str(state.ADMIN_KUBECONFIG), *args],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise ChartError(f"helm {' '.join(args[:3])} failed: {proc.stderr.strip()}")
    return proc


def _ca_secret() -> list[dict]:
    """The namespace and the host's memsnap CA as the chart's tls.existingSecret."""
    pki.CA.ensure()
    data = {"ca.crt": (pki.PKI_DIR / "ca.crt").read_bytes(), "ca.key": (pki.PKI_DIR / "ca.key").read_bytes()}
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": CA_SECRET, "namespace": NAMESPACE},
             "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}]


def _apply(objects: list[dict]) -> None:
    kubectl = kbuild.ensure().bin("kubectl")
    proc = subprocess.run([str(kubectl), f"--kubeconfig={state.ADMIN_KUBECONFIG}", "apply", "-f", "-"],
                          input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
                          capture_output=True, text=True, timeout=60)
    if proc.returncode:
        raise ChartError(f"kubectl apply (namespace {NAMESPACE}, CA secret) failed: {proc.stderr.strip()}")


# ---- readiness ---------------------------------------------------------------------------

def wait_ready(count: int, operator: bool, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        waiting = _not_ready(count, operator)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ChartError(f"memsnap's chart is not ready after {timeout:.0f} s: {waiting}; "
                             f"pods: {_pod_report()}")
        time.sleep(1.0)


def _not_ready(count: int, operator: bool) -> str:
    """"" when ready, else what is still missing."""
    ds = api.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{AGENT_DAEMONSET}")
    s = ds.get("status", {})
    if not ds:
        return f"no DaemonSet {AGENT_DAEMONSET}"
    if (s.get("observedGeneration", 0) < ds["metadata"].get("generation", 1)
            or s.get("updatedNumberScheduled", 0) < count or s.get("numberReady", 0) < count):
        return f"agents Ready on {s.get('numberReady', 0)} of {count} nodes"
    if operator:
        dep = api.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{OPERATOR_DEPLOYMENT}")
        if not dep or dep.get("status", {}).get("availableReplicas", 0) < 1:
            return "the operator is not available"
    return ""


def describe(count: int) -> str:
    """The release's state in a line, for `memsnap cluster status`."""
    try:
        missing = _not_ready(count, operator=False)
        dep = api.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{OPERATOR_DEPLOYMENT}")
    except api.ApiError as exc:
        return f"unknown ({exc})"
    agents = missing or f"agents Ready on {count} of {count} nodes"
    if not dep:
        return f"{agents}; no operator"
    want, have = dep["spec"].get("replicas", 1), dep.get("status", {}).get("availableReplicas", 0)
    return f"{agents}; operator {'not run (replicas 0)' if not want else f'available {have} of {want}'}"


def _pod_report() -> str:
    """Each pod of the release with its phase and why a container waits or ended."""
    items = api.get(f"/api/v1/namespaces/{NAMESPACE}/pods").get("items", [])
    out = []
    for pod in items:
        why = []
        for c in pod["status"].get("initContainerStatuses", []) + pod["status"].get("containerStatuses", []):
            st = c.get("state", {})
            detail = st.get("waiting") or st.get("terminated")
            if detail:
                why.append(f"{c['name']}: {detail.get('reason', '')} {detail.get('message', '')}".strip())
        out.append(f"{pod['metadata']['name']} on {pod['spec'].get('nodeName', '?')} "
                   f"{pod['status'].get('phase')} ({'; '.join(why) or 'running'})")
    return "; ".join(out) or "none"
