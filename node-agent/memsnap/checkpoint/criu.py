"""Driving the criu binary: dump a frozen tree, restore a chain."""
from __future__ import annotations

import errno
import functools
import os
import re
import select
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable


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
                 when_ready: Callable[[], None], vmflags_dir: Path | None = None,
                 meanwhile: Callable[[], None] | None = None) -> None:
    """Dump against a parent, taking dirty bits from the uffd-wp protection a tracker keeps
    (memsnap's CRIU, node-agent/criu/patches/0002): only pages written since the parent.

    CRIU starts before anything stops: once it has set itself up (options, kernel feature
    probes: ~30 ms that do not depend on the tasks), its pre-dump action calls back and
    when_ready() freezes the tree and hands the tracking over; then CRIU dumps. If when_ready
    raises, CRIU is told to give up and the error goes on. The tree is left frozen
    (--leave-running on a frozen cgroup): the caller ends or thaws it. meanwhile() runs while
    CRIU sets itself up; vmflags_dir holds VMA flags read before the freeze (patch 0009,
    checkpoint/vmflags.py)."""
    # -v2 (errors and warnings): at -v4 CRIU logs a line per run of pages, while frozen.
    args = ["dump", "-t", str(pid), "-D", str(directory), "-o", "dump.log", "-v2",
            "--track-mem-uffd", "--prev-images-dir", parent_rel, "--freeze-cgroup", str(freeze_cgroup),
            "--leave-running"]
    if vmflags_dir is not None:
        args += ["--vmflags-dir", str(vmflags_dir)]
    with _PreDumpHandshake() as hook:
        proc = subprocess.Popen([binary(), *args, "--action-script", hook.script],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if meanwhile is not None:
                meanwhile()
            ready = hook.wait_ready(proc)
            if ready:
                try:
                    when_ready()
                except BaseException:
                    hook.answer("stop")
                    raise
                hook.answer("go")
        except BaseException:
            proc.kill()  # it has not touched the tasks: the pre-dump action comes first
            proc.communicate()
            raise
        stderr = proc.communicate()[1]
        _check(proc.returncode, stderr, args, directory / "dump.log")
        if not ready:
            raise CriuError("criu dump exited before its pre-dump action ran")


class _PreDumpHandshake:
    """CRIU's pre-dump action script, held until memsnap answers: two FIFOs in a private
    directory. The script tells "ready" and waits (at most HOOK_WAIT s, should memsnap die)
    for "go"; any other answer makes it fail, and CRIU then stops before touching the tasks."""

    HOOK_WAIT = 60

    def __enter__(self) -> _PreDumpHandshake:
        self.dir = Path(tempfile.mkdtemp(prefix="memsnap-criu-"))
        self.ready, self.reply = self.dir / "ready", self.dir / "answer"
        os.mkfifo(self.ready, 0o600)
        os.mkfifo(self.reply, 0o600)
        self._ready_fd = os.open(self.ready, os.O_RDONLY | os.O_NONBLOCK)  # before CRIU: its echo must not block
        r, a = shlex.quote(str(self.ready)), shlex.quote(str(self.reply))
        # CRIU executes the script's path itself (no shell), so it is a file.
        self.script = str(self.dir / "hook.sh")
        fd = os.open(self.script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as script:
            script.write(f'#!/bin/sh\n[ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ] || exit 0\necho ready > {r}\n'
                         f'[ "$(timeout {self.HOOK_WAIT} head -n1 {a})" = go ]\n')
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._ready_fd)
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
        """Whether CRIU reached its pre-dump action (False: it exited first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self._ready_fd], [], [], 0.02)[0] and os.read(self._ready_fd, 64):
                return True
            if proc.poll() is not None:
                return False
        raise CriuError(f"criu dump did not reach its pre-dump action within {timeout:.0f} s")

    def answer(self, word: str) -> None:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                fd = os.open(self.reply, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:  # ENXIO: the script has not opened its end yet
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise CriuError(f"criu's pre-dump action did not wait for memsnap: {exc}") from None
                time.sleep(0.0005)
        try:
            os.write(fd, f"{word}\n".encode())
        finally:
            os.close(fd)


def has_uffd_tracking() -> bool:
    """Whether this CRIU takes dirty bits from uffd-wp (--track-mem-uffd)."""
    return "--track-mem-uffd" in _help()


def has_vmflags_dir() -> bool:
    """Whether this CRIU takes VMA flags read before the freeze (--vmflags-dir, patch 0009)."""
    return "--vmflags-dir" in _help()


@functools.cache
def _help() -> str:
    result = subprocess.run([binary(), "--help"], capture_output=True, text=True)
    return result.stdout + result.stderr


def dump_stats(directory: Path) -> dict[str, int]:
    """CRIU's own account of a dump (stats-dump): times in microseconds and page counts."""
    import pycriu.images
    with open(directory / "stats-dump", "rb") as f:
        return dict(pycriu.images.load(f)["entries"][0]["dump"])


# -v3 (info): at -v4 CRIU logs a line per pagemap entry it restores or leaves lazy, tens of
# thousands for a 4 GiB workload's chain (~24 ms of a migration's pause here); the counts
# memsnap reads (nr_lazy) are info lines.
RESTORE_LOG_LEVEL = "-v3"


def restore(directory: Path, pidfile: Path, log_dir: Path, preexec_fn=None) -> None:
    """Restore detached. The tree comes back in the caller's cgroups (preexec_fn may move the
    criu process first): cgroups are the runtime's to give, and the ones it was dumped from
    (memsnap's frozen freezer cgroup among them) must not come back."""
    _run(["restore", "-D", str(directory), "-d", "--pidfile", str(pidfile), "--manage-cgroups=ignore",
          "-o", str(log_dir / "restore.log"), RESTORE_LOG_LEVEL], log_dir / "restore.log", preexec_fn)


def restore_lazy(directory: Path, pidfile: Path, log_dir: Path, preexec_fn=None) -> None:
    """As restore(), leaving the lazy pages to the lazy-pages daemon serving directory
    (start_lazy_pages): the tree runs before they are read."""
    _run(["restore", "-D", str(directory), "-d", "--lazy-pages", "--pidfile", str(pidfile),
          "--manage-cgroups=ignore", "-o", str(log_dir / "restore.log"), RESTORE_LOG_LEVEL],
         log_dir / "restore.log", preexec_fn)


def start_lazy_pages(directory: Path, log: Path, timeout: float = 10.0) -> subprocess.Popen:
    """`criu lazy-pages` serving directory's own images (no page server), in the foreground of
    a child we can watch: it exits 0 once every lazy page is in, non-zero if the fill failed.
    Returns once it listens (--status-fd), so that a restore can connect."""
    ready_r, ready_w = os.pipe()
    try:
        proc = subprocess.Popen([binary(), "lazy-pages", "-D", str(directory), "-o", str(log), "-v2",
                                 "--status-fd", str(ready_w)], pass_fds=(ready_w,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        os.close(ready_w)
    try:
        if not select.select([ready_r], [], [], timeout)[0] or not os.read(ready_r, 1):
            proc.kill()
            proc.wait()
            raise CriuError(f"criu lazy-pages did not start: {_tail(log)}")
    finally:
        os.close(ready_r)
    return proc


def restored_lazy_pages(log_dir: Path) -> int:
    """Pages the restore left to the lazy-pages daemon (CRIU's `nr_lazy`, summed over tasks)."""
    try:
        text = (log_dir / "restore.log").read_text(errors="replace")
    except OSError:
        return 0
    return sum(int(m) for m in re.findall(r"nr_lazy:\s+(\d+)", text))


def _run(args: list[str], log: Path, preexec_fn=None) -> None:
    result = subprocess.run([binary(), *args], capture_output=True, text=True, preexec_fn=preexec_fn)
    _check(result.returncode, result.stderr, args, log)


def _check(returncode: int, stderr: str, args: list[str], log: Path) -> None:
    if returncode != 0:
        tail = _tail(log) or stderr.strip()
        raise CriuError(f"criu {args[0]} failed (exit {returncode}): {tail}")


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
