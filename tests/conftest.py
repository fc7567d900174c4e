"""Shared fixtures: real workload processes, and `memsnap` run as a real command."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = REPO / "node-agent" / "memsnap" / "workload.py"
MEMSNAP = [sys.executable, "-m", "memsnap.cli"]


class Workload:
    """A running memsnap.workload process, driven over its stdin/stdout."""

    def __init__(self, *, mib: int = 16, user: str | None = None, python: str = sys.executable):
        script = WORKLOAD
        preexec = None
        self._tmp = None
        if user:
            # An unprivileged target needs a python and a script it may read.
            self._tmp = tempfile.mkdtemp(prefix="memsnap-wl-")
            os.chmod(self._tmp, 0o755)
            script = Path(shutil.copy(WORKLOAD, self._tmp))
            os.chmod(script, 0o644)
            ids = pwd.getpwnam(user)
            python = "/usr/bin/python3"

            def preexec():
                os.setgroups([])
                os.setgid(ids.pw_gid)
                os.setuid(ids.pw_uid)
        # A session of its own, so that stop() also ends the children it forks.
        self.proc = subprocess.Popen([python, str(script), "--mib", str(mib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=preexec, cwd="/",
                                     start_new_session=True)
        self.info = json.loads(self.proc.stdout.readline())
        self.pid: int = self.info["pid"]
        self.base: int = self.info["base"]
        self.page: int = self.info["page_size"]

    def send(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        assert reply.startswith("ok"), f"workload answered {reply!r} to {line!r}"
        return reply[3:]

    def start(self, line: str) -> None:
        """Send a command without waiting for its answer (see finish())."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> str:
        return self.proc.stdout.readline().strip()

    def pages(self, first: int, count: int, stride: int = 1) -> set[int]:
        """Addresses of region pages, as the workload numbers them."""
        return {self.base + (first + i * stride) * self.page for i in range(count)}

    def in_region(self, addresses) -> set[int]:
        end = self.base + self.info["size"]
        return {a for a in addresses if self.base <= a < end}

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


@pytest.fixture
def workload():
    started: list[Workload] = []

    def make(**kwargs) -> Workload:
        w = Workload(**kwargs)
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    """Each test keeps memsnap's /run state in a directory of its own."""
    path = tmp_path / "run"
    monkeypatch.setenv("MEMSNAP_RUN_DIR", str(path))
    return path


def memsnap(*args: str, check: bool = False, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `memsnap` command line."""
    result = subprocess.run([*MEMSNAP, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def leftovers(pid: int) -> dict:
    """What tracking could leave in a process: injected fds, armed VMAs, stopped threads."""
    fds = [fd for fd in os.listdir(f"/proc/{pid}/fd")
           if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"]
    armed = 0
    with open(f"/proc/{pid}/smaps") as f:
        armed = sum(1 for line in f if line.startswith("VmFlags:") and " uw" in line)
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            tracer = [line.split()[1] for line in f if line.startswith("TracerPid:")][0]
        if tracer != "0":
            states.append(f"traced by {tracer}")
    return {"uffd_fds": fds, "armed_vmas": armed,
            "stopped": [s for s in states if s in ("t", "T") or s.startswith("traced")]}


CLEAN = {"uffd_fds": [], "armed_vmas": 0, "stopped": []}


from memsnap.nodes.testing import local_nodes  # noqa: E402,F401  (session fixture: node-1, node-2)
from memsnap.cluster.testing import cluster, kubectl  # noqa: E402,F401  (session fixtures: a two-node cluster)


def pytest_collection_modifyitems(config, items):
    """Cluster tests last: `memsnap cluster up` restarts node-1 and node-2 for its kubelets, which
    must not happen under the feet of tests using the plain local nodes.
    Those that break or stop the cluster (cluster(destructive=True)) come at the very end."""
    def order(item) -> tuple[bool, bool]:
        marker = item.get_closest_marker("cluster")
        return marker is not None, bool(marker and marker.kwargs.get("destructive"))
    items.sort(key=order)
