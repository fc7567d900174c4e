"""Driving the criu binary: dump a frozen tree, restore a chain."""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path


class CriuError(Exception):
    """criu failed; the message quotes the end of its log."""


def binary() -> str:
    path = shutil.which("criu") or next((p for p in ("/usr/sbin/criu", "/sbin/criu") if Path(p).exists()), None)
    if path is None:
        raise CriuError("criu is not installed (memsnap runs it inside a node: see `memsnap nodes`)")
    return path


def dump(pid: int, directory: Path, freeze_cgroup: Path | None, leave_running: bool = False) -> None:
    args = ["dump", "-t", str(pid), "-D", str(directory), "-o", "dump.log", "-v4"]
    if freeze_cgroup is not None:
        args += ["--freeze-cgroup", str(freeze_cgroup)]
    if leave_running:
        args.append("--leave-running")
    _run(args, directory / "dump.log")


def dump_tracked(pid: int, directory: Path, parent_rel: str, freeze_cgroup: Path,
                 leave_running: bool = False) -> None:
    """Dump against a parent, taking dirty bits from the uffd-wp protection a tracker keeps
    (memsnap's CRIU, node-agent/criu/patches/0002): only pages written since the parent."""
    # -v2 (errors and warnings): at -v4 CRIU logs a line per run of pages, while frozen.
    args = ["dump", "-t", str(pid), "-D", str(directory), "-o", "dump.log", "-v2",
            "--track-mem-uffd", "--prev-images-dir", parent_rel, "--freeze-cgroup", str(freeze_cgroup)]
    _run(args + (["--leave-running"] if leave_running else []), directory / "dump.log")


@functools.cache
def has_uffd_tracking() -> bool:
    """Whether this CRIU takes dirty bits from uffd-wp (--track-mem-uffd)."""
    result = subprocess.run([binary(), "--help"], capture_output=True, text=True)
    return "--track-mem-uffd" in result.stdout + result.stderr


def dump_stats(directory: Path) -> dict[str, int]:
    """CRIU's own account of a dump (stats-dump): times in microseconds and page counts."""
    import pycriu.images
    with open(directory / "stats-dump", "rb") as f:
        return dict(pycriu.images.load(f)["entries"][0]["dump"])


def restore(directory: Path, pidfile: Path, log_dir: Path, preexec_fn=None) -> None:
    """Restore detached. The tree comes back in the caller's cgroups (preexec_fn may move the
    criu process first): cgroups are the runtime's to give, and the ones it was dumped from
    (memsnap's frozen freezer cgroup among them) must not come back."""
    _run(["restore", "-D", str(directory), "-d", "--pidfile", str(pidfile), "--manage-cgroups=ignore",
          "-o", str(log_dir / "restore.log"), "-v4"], log_dir / "restore.log", preexec_fn)


def _run(args: list[str], log: Path, preexec_fn=None) -> None:
    result = subprocess.run([binary(), *args], capture_output=True, text=True, preexec_fn=preexec_fn)
    if result.returncode != 0:
        tail = _tail(log) or result.stderr.strip()
        raise CriuError(f"criu {args[0]} failed (exit {result.returncode}): {tail}")


def _tail(log: Path, lines: int = 3) -> str:
    try:
        errors = [line for line in log.read_text(errors="replace").splitlines() if "Error" in line]
        return " | ".join((errors or log.read_text(errors="replace").splitlines())[-lines:])
    except OSError:
        return ""


def has_dirty_tracking() -> tuple[bool, str]:
    """Whether CRIU can track memory itself (soft-dirty): its --track-mem incremental dumps."""
    result = subprocess.run([binary(), "check", "--feature", "mem_dirty_track"], capture_output=True, text=True)
    if result.returncode == 0:
        return True, "criu check: mem_dirty_track is supported (soft-dirty)"
    return False, "CRIU's own incremental dumps need soft-dirty tracking, which this kernel lacks"


def pre_dump(pid: int, directory: Path, parent_rel: str | None) -> None:
    """CRIU's own pre-copy layer (soft-dirty kernels only); it links `parent` itself."""
    args = ["pre-dump", "-t", str(pid), "-D", str(directory), "--track-mem", "-o", "dump.log", "-v4"]
    if parent_rel:
        args += ["--prev-images-dir", parent_rel]
    _run(args, directory / "dump.log")


def dump_incremental(pid: int, directory: Path, parent_rel: str | None, freeze_cgroup: Path | None) -> None:
    args = ["dump", "-t", str(pid), "-D", str(directory), "--track-mem", "-o", "dump.log", "-v4"]
    if parent_rel:
        args += ["--prev-images-dir", parent_rel]
    if freeze_cgroup is not None:
        args += ["--freeze-cgroup", str(freeze_cgroup)]
    _run(args, directory / "dump.log")
