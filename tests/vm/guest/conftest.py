"""Fixtures for the tests that run inside the memsnap guest (kernel/vm-run).

On the host these tests are not collected: tests/vm/test_guest.py boots the
guest and runs them there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from memsnap.kernel import tracefs, write_events

if not os.environ.get("MEMSNAP_IN_VM"):
    collect_ignore_glob = ["test_*.py"]

PAGE = os.sysconf("SC_PAGE_SIZE")
WORKLOAD = Path(__file__).with_name("workload.py")


class Workload:
    """A child process writing exactly the pages we tell it to (workload.py)."""

    def __init__(self, pages: int, align: int = PAGE):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKLOAD), str(pages), str(align)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.pages = pages
        self.addr = int(self._readline(), 16)
        self.pidfd = write_events.pidfd_open(self.pid)

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"workload {self.pid} died (rc={self.proc.wait()})")
        return line.strip()

    def do(self, *cmd: object) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, cmd)) + "\n")
        self.proc.stdin.flush()
        reply = self._readline()
        assert reply.startswith("ok"), reply
        return reply[3:]

    def write(self, *pages: int) -> None:
        self.do("write", *pages)

    def page(self, index: int) -> int:
        return self.addr + index * PAGE

    @property
    def range(self) -> tuple[int, int]:
        return (self.addr, self.pages * PAGE)

    def mark(self) -> None:
        write_events.mark(self.pidfd, [self.range])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.pidfd)


@pytest.fixture
def trace() -> Iterator[tracefs.Instance]:
    inst = tracefs.Instance.create("memsnap-test", buffer_kb=1024)
    try:
        yield inst
    finally:
        inst.remove()


@pytest.fixture
def workload_factory() -> Iterator:
    started: list[Workload] = []

    def start(pages: int, align: int = PAGE) -> Workload:
        w = Workload(pages, align)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def workload(workload_factory) -> Workload:
    return workload_factory(64)
