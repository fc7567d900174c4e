"""The tracker's own tests, run inside the memsnap kernel: there every backend is available
(soft-dirty and the tracepoint patch, which the host kernel lacks), so each is held to the
same checks as uffd-wp on the host."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(3600)]


def test_tracking_suite_with_every_backend() -> None:
    r = subprocess.run([str(TOP / "kernel" / "vm-run"), "--", "python", "-m", "pytest", "-p", "no:cacheprovider",
                        "--color=no", "-q", "-rs", "tests/tracking"],
                       cwd=TOP, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    print(r.stdout[-5000:])
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert "unavailable here" not in r.stdout, "a backend was unavailable in the guest"
