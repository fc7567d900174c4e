"""Pod migration on `memsnap cluster` (node side, no operator): the pause a pod's workload feels
when the agents move it to another node's target pod (RuntimeClass memsnap, memsnap-runc), vs
`memsnap migrate` of a plain process of the same size between the same nodes, and the time of
`runc restore` inside the wrapper. One run each. Needs a cluster: run it as

    flock /run/memsnap-dev-nodes.lock sh -c 'memsnap cluster up && python -m bench.pod_migration; memsnap cluster down'
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from memsnap.cluster import build as kbuild
from memsnap.cluster import oci, state
from memsnap.cluster.testing import run_cli
from memsnap.nodes import agents

from .common import table
from .migration import Ticker

SRC, DST = "node-1", "node-2"
IMAGE = "memsnap.local/counter:1"
COUNTER = Path(__file__).resolve().parent.parent / "tests" / "podmigration" / "counter.c"
LINE = re.compile(r"^token=(\w+) count=(\d+) sum=(\w+) maxgap_ms=([\d.]+)$")


def kubectl(*args: str, input: str | None = None) -> str:
    proc = subprocess.run([str(kbuild.ensure().bin("kubectl")), f"--kubeconfig={state.ADMIN_KUBECONFIG}", *args],
                          capture_output=True, text=True, input=input, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def call(node: str, method: str, path: str, body: dict | None = None) -> dict:
    async def go():
        async with agents.client(node) as c:
            async with c.request(method, path, json=body) as resp:
                return await resp.json()
    return asyncio.run(go())


def prepare() -> None:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["gcc", "-O2", "-static", "-o", f"{d}/counter", str(COUNTER)], check=True)
        oci.write_docker_archive(Path(d) / "c.tar", IMAGE, {"counter": Path(d) / "counter"}, entrypoint=["/counter"])
        assert run_cli("load", f"{d}/c.tar").returncode == 0
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                                                   "metadata": {"name": "memsnap"}, "handler": "memsnap"}))


def last_line(name: str):
    out = kubectl("logs", name)
    return [m for m in map(LINE.match, out.splitlines()) if m][-1]


def pod_move(mib: int) -> dict:
    name = f"bench-{uuid.uuid4().hex[:6]}"
    spec = {"nodeName": SRC, "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "counter", "image": IMAGE, "imagePullPolicy": "Never", "args": [str(mib)]}]}
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Pod",
                                                   "metadata": {"name": name}, "spec": spec}))
    kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s")
    while True:
        try:
            first = last_line(name)
            break
        except (IndexError, RuntimeError):
            time.sleep(0.5)
    time.sleep(2)
    uid = json.loads(kubectl("get", "pod", name, "-o", "json"))["metadata"]["uid"]
    mig = str(uuid.uuid4())
    began = time.monotonic()
    call(SRC, "POST", "/api/v1/migrations", {"pod": {"namespace": "default", "name": name, "uid": uid}, "id": mig,
                                            "to": DST, "targetPod": {"namespace": "default", "name": name + "-2"}})
    target = {"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": name + "-2", "annotations": {"memsnap.io/restore-from": mig}},
              "spec": {**spec, "nodeName": DST, "runtimeClassName": "memsnap"}}
    kubectl("apply", "-f", "-", input=json.dumps(target))
    while (st := call(SRC, "GET", f"/api/v1/migrations/{mig}"))["phase"] not in ("HandedOver", "RolledBack", "Failed"):
        time.sleep(0.1)
    if st["phase"] != "HandedOver":
        raise RuntimeError(st["message"])
    kubectl("delete", "pod", name, "--grace-period=0", "--force")
    st = call(SRC, "POST", f"/api/v1/migrations/{mig}/complete")
    total = time.monotonic() - began
    time.sleep(2.5)
    after = last_line(name + "-2")
    kubectl("delete", "pod", name + "-2", "--grace-period=0", "--force")
    assert (after[1], after[3]) == (first[1], first[3]), "token or memory differ after the move"
    return {"felt_ms": float(after[4]), "downtime_ms": st["downtimeMs"], "total_s": round(total, 1),
            "iterations": st["iterations"], "phases": st["pausePhases"], "how": st["finalImages"],
            "lazy_mib": st.get("lazyBytes", 0) >> 20, "fill_s": st.get("fillSeconds")}


def process_move(mib: int) -> dict:
    t = Ticker(mib, rate=mib * 1024 / 4 / 100)  # ~1 % of the pages per second, as bench 7
    try:
        r = t.migrate()
    finally:
        t.stop()
    return {"felt_ms": r.get("felt_ms"), "downtime_ms": r.get("downtime_ms"), "total_s": r.get("total_seconds"),
            "iterations": r.get("iterations"), "phases": r.get("pause_phases")}


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def run(sizes=(64, 256)) -> str:
    prepare()
    rows, details = [], []
    for mib in sizes:
        pod, proc = pod_move(mib), process_move(mib)
        rows.append([f"{mib} MiB", f"{pod['felt_ms']:.0f}", f"{pod['downtime_ms']:.0f}",
                     f"{pod['phases'].get('restore (target)', 0):.0f}", f"{pod['lazy_mib']} / {pod['fill_s']}",
                     f"{pod['total_s']}",
                     _ms(proc["felt_ms"]), _ms(proc["downtime_ms"])])
        details.append(f"{mib} MiB pod: {json.dumps(pod)}\n{mib} MiB process: {json.dumps(proc)}")
    head = ["workload", "pod: pause felt ms", "pod: pause ms (agent)", "runc restore ms (wrapper)",
            "pod: lazily filled MiB / fill s", "pod: total s",
            "process: pause felt ms", "process: pause ms (agent)"]
    return table(head, rows) + "\n\n" + "\n".join(details)


if __name__ == "__main__":
    print(run(tuple(int(a) for a in sys.argv[1:]) or (64, 256)))
