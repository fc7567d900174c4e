"""Boot the memsnap kernel (kernel/vm-run) and run the guest tests inside it.

The first run builds the kernel if the cache is cold (about 6 minutes on 2
cores, plus a few minutes to create the Debian 13 build root once).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
VM_RUN = TOP / "kernel" / "vm-run"

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(3600)]


def vm_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VM_RUN), *args], cwd=TOP, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_vm_run_contract(tmp_path: Path) -> None:
    """Output, exit code, read-write shares, read-only root, tracefs."""
    script = (f"echo hello; echo data > {tmp_path}/f; touch /usr/x 2>/dev/null && exit 1; "
              "test -d /sys/kernel/tracing/events/memsnap || exit 2; "
              "command -v memsnap >/dev/null || exit 3; exit 7")
    r = vm_run("--share", str(tmp_path), "--", "bash", "-c", script)
    assert r.returncode == 7, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["hello"]
    assert (tmp_path / "f").read_text() == "data\n"


def test_guest_suite() -> None:
    r = vm_run("--", "python", "-m", "pytest", "-p", "no:cacheprovider", "--color=no",
               "-q", "-rs", "tests/vm/guest")
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
