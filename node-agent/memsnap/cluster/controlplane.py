"""The control plane on the host: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

They run as plain host processes (each in its own session, recorded by pid and start time in the
cluster state), etcd on loopback only, the API server on the nodes' bridge address so that every
kubelet reaches it. Node heartbeats are tightened (lease 12 s, grace 16 s) so a dead kubelet
shows as NotReady within seconds rather than a minute.
"""
from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from typing import Callable

from memsnap.cluster import build as kbuild
from memsnap.cluster import kubeconfig, state

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
NODE_MONITOR_GRACE = "16s"


class StartError(RuntimeError):
    """A component did not start; the message names it and its log."""


def _etcd(b: kbuild.Build) -> list[str]:
    data = state.DATA_DIR / "etcd"
    return [str(b.bin("etcd")), "--name", "memsnap", "--data-dir", str(data),
            "--listen-client-urls", f"http://{state.ETCD_CLIENT}", "--advertise-client-urls", f"http://{state.ETCD_CLIENT}",
            "--listen-peer-urls", f"http://{state.ETCD_PEER}", "--initial-advertise-peer-urls", f"http://{state.ETCD_PEER}",
            "--initial-cluster", f"memsnap=http://{state.ETCD_PEER}", "--listen-metrics-urls", "http://127.0.0.1:23810"]


def _apiserver(b: kbuild.Build) -> list[str]:
    return [str(b.bin("kube-apiserver")),
            f"--etcd-servers=http://{state.ETCD_CLIENT}",
            f"--bind-address={state.API_ADDRESS}", f"--advertise-address={state.API_ADDRESS}",
            f"--secure-port={state.API_PORT}", "--insecure-port=0", f"--cert-dir={kubeconfig.CERT_DIR}",
            f"--token-auth-file={kubeconfig.TOKENS}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={kubeconfig.SA_KEY}", f"--service-account-signing-key-file={kubeconfig.SA_KEY}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={state.SERVICE_RANGE}",
            "--kubelet-preferred-address-types=InternalIP", "--allow-privileged=true", "--v=1"]


def _controller_manager(b: kbuild.Build, kcfg: str) -> list[str]:
    return [str(b.bin("kube-controller-manager")), f"--kubeconfig={kcfg}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={kubeconfig.SA_KEY}", f"--root-ca-file={kubeconfig.SERVING_CERT}",
            "--bind-address=127.0.0.1", "--port=0", "--leader-elect=false",
            f"--node-monitor-grace-period={NODE_MONITOR_GRACE}", "--node-monitor-period=2s", "--v=1"]


def _scheduler(b: kbuild.Build, kcfg: str) -> list[str]:
    return [str(b.bin("kube-scheduler")), f"--kubeconfig={kcfg}", "--bind-address=127.0.0.1", "--port=0",
            "--leader-elect=false", "--v=1"]


def start(b: kbuild.Build, st: state.State, tokens: dict[str, str], record: Callable[[], None]) -> None:
    """Start the four components in order, each once the one before answers; record() after each."""
    st.processes["etcd"] = state.spawn("etcd", _etcd(b))
    record()
    _wait_http("etcd", st.processes["etcd"], "http://127.0.0.1:23790/health", lambda body: b'"true"' in body)
    st.processes["kube-apiserver"] = state.spawn("kube-apiserver", _apiserver(b))
    record()
    _wait_api(st.processes["kube-apiserver"], tokens[kubeconfig.ADMIN[0]])
    cm = kubeconfig.write(state.DATA_DIR / "controller-manager.kubeconfig", *_cred(tokens, kubeconfig.CONTROLLER_MANAGER))
    sched = kubeconfig.write(state.DATA_DIR / "scheduler.kubeconfig", *_cred(tokens, kubeconfig.SCHEDULER))
    st.processes["kube-controller-manager"] = state.spawn("kube-controller-manager", _controller_manager(b, str(cm)))
    st.processes["kube-scheduler"] = state.spawn("kube-scheduler", _scheduler(b, str(sched)))
    record()


def _cred(tokens: dict[str, str], identity: tuple[str, str]) -> tuple[str, str]:
    return identity[0], tokens[identity[0]]


def stop(st: state.State) -> None:
    for name in reversed(COMPONENTS):
        proc = st.processes.get(name)
        if proc:
            state.stop(proc)


def health(st: state.State) -> dict[str, str]:
    """component -> "running" or why not."""
    out = {}
    for name in COMPONENTS:
        proc = st.processes.get(name)
        if proc is None:
            out[name] = "never started"
        elif proc.running:
            out[name] = "running"
        else:
            out[name] = f"not running (pid {proc.pid} is gone), log: {proc.log}"
    return out


def _wait_http(name: str, proc: state.Process, url: str, ok: Callable[[bytes], bool],
               headers: dict[str, str] | None = None, timeout: float = 90.0) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only a readiness probe
    deadline = time.monotonic() + timeout
    while True:
        if not proc.running:
            raise StartError(f"{name} exited at start; log: {proc.log}\n{state.log_tail(proc.log)}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=3, context=ctx) as resp:
                if ok(resp.read()):
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise StartError(f"{name} did not become ready within {timeout:.0f} s; log: {proc.log}")
        time.sleep(0.3)


def _wait_api(proc: state.Process, admin_token: str) -> None:
    _wait_http("kube-apiserver", proc, f"{kubeconfig.server_url()}/readyz",
               lambda body: body.strip() == b"ok", headers={"Authorization": f"Bearer {admin_token}"})
