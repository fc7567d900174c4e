"""Real pod-style cgroups, and `memsnap agent` run as a real server on loopback."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

CGROUP = Path("/sys/fs/cgroup")
# Runs `memsnap agent` whether or not cli.py lists the command yet.
AGENT = [sys.executable, "-c", "import sys, memsnap.cli as c; "
         "'memsnap.commands.agent' in c.COMMANDS or c.COMMANDS.append('memsnap.commands.agent'); "
         "sys.exit(c.main())", "agent"]


@dataclass(frozen=True)
class PodCgroup:
    path: Path
    pod_uid: str
    container_id: str


def layouts() -> dict[str, str]:
    """Where kubelet and the runtime would put a container, per cgroup version and driver.
    {uid} has dashes, {uid_} underscores (systemd escaping), {cid} is the container ID."""
    return {
        "v1-cgroupfs-containerd": "memory/kubepods/burstable/pod{uid}/{cid}",
        "v1-systemd-containerd": "memory/kubepods.slice/kubepods-burstable.slice/"
                                 "kubepods-burstable-pod{uid_}.slice/cri-containerd-{cid}.scope",
        "v2-cgroupfs-crio": "unified/kubepods/besteffort/pod{uid}/crio-{cid}",
        "v2-systemd-crio": "unified/kubepods.slice/kubepods-pod{uid_}.slice/crio-{cid}.scope",
    }


class Cgroups:
    """Creates pod cgroups; on close moves any process left in them back, and removes every
    directory it created (shared parents such as kubepods only when empty)."""

    def __init__(self):
        self.created: list[Path] = []

    def pod(self, layout: str) -> PodCgroup:
        if os.geteuid() != 0:
            pytest.skip("creating cgroups needs root")
        uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
        rel = layouts()[layout].format(uid=uid, uid_=uid.replace("-", "_"), cid=cid)
        path = CGROUP / rel
        if not (CGROUP / rel.split("/")[0]).is_dir():
            pytest.skip(f"no cgroup hierarchy at {CGROUP / rel.split('/')[0]}")
        self._makedirs(path)
        return PodCgroup(path, uid, cid)

    def place(self, pid: int, cg: PodCgroup) -> None:
        (cg.path / "cgroup.procs").write_text(str(pid))

    def _makedirs(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            p.mkdir()
            self.created.append(p)

    def close(self) -> None:
        for path in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            _evacuate(path)
            for _ in range(20):  # EBUSY while a killed process is still leaving
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)  # a shared parent another user still fills stays, after 2 s


def _evacuate(path: Path) -> None:
    """Move processes still in path back to where this test process lives in that hierarchy."""
    root = next(p for p in path.parents if p.parent == CGROUP)
    home = root / _own_cgroup(root.name).lstrip("/")
    try:
        pids = (path / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return
    for pid in pids:
        try:
            (home / "cgroup.procs").write_text(pid)
        except OSError:
            pass


def _own_cgroup(hierarchy: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (hierarchy == "unified" and controllers == "") or hierarchy in controllers.split(","):
            return path
    return "/"


@pytest.fixture
def cgroups():
    cg = Cgroups()
    yield cg
    cg.close()


# The agent as a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, *args: str, interval: float = 1.0, port: int | None = None, log: Path,
                 kubeconfig: str = "none", tls: bool = False, command: list[str] = AGENT):
        """tls: args hold --tls-*; the open routes (url) are then on a plain port of their own."""
        self.port = port or free_port()
        self.plain_port = free_port() if tls else self.port
        self.url = f"http://127.0.0.1:{self.plain_port}"
        self.log = log
        self.command = command
        self.args = ["--listen", f"127.0.0.1:{self.port}", "--interval", str(interval),
                     "--kubeconfig", kubeconfig, *args]
        if tls:
            self.args += ["--metrics-listen", f"127.0.0.1:{self.plain_port}"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Agent:
        self.logfile = open(self.log, "a")
        self.proc = subprocess.Popen([*self.command, *self.args], stdout=self.logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"agent exited: {self.log.read_text()}"
            try:
                if self.get("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent not ready in {timeout}s: {self.log.read_text()}")

    def get(self, path: str, token: str | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def api(self, path: str = "/api/v1/pods", token: str | None = None) -> dict:
        status, body = self.get(path, token)
        assert status == 200, body
        return json.loads(body)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels): value}"""
        status, body = self.get("/metrics")
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(body) for s in fam.samples}

    def value(self, name: str, **labels) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def pod(self, uid: str) -> dict | None:
        return next((p for p in self.api()["pods"] if p["uid"] == uid), None)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.logfile.close()

    def kill_if_running(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc:
            self.logfile.close()


@pytest.fixture
def agent(tmp_path):
    """agent(*flags) starts a real `memsnap agent`; every one started is stopped (SIGTERM)."""
    started: list[Agent] = []

    def start(*args: str, **kwargs) -> Agent:
        a = Agent(*args, log=tmp_path / f"agent-{len(started)}.log", **kwargs)
        started.append(a)
        return a.start()

    yield start
    for a in started:
        if a.proc and a.proc.poll() is None:
            a.stop()
        a.kill_if_running()


def wait_for(check, timeout: float = 20, every: float = 0.2, what: str = "condition", explain=None):
    """Poll check() until it returns a truthy value; return that value. explain(): what to show
    beside the last value when it times out (the agent's view, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"; {explain()!r}" if explain else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r}{seen})")
        time.sleep(every)

