"""Run syscalls inside another process, and briefly stop all of its threads.

Injection (the same trick CRIU's compel and gdb use, reduced to one instruction): seize one
thread with ptrace, interrupt it, save its registers, point it at a `syscall` instruction found
in its own vDSO with the call's arguments loaded, single-step it, read the result, put the
registers back and detach. A thread interrupted inside a blocking syscall restarts that syscall
when it resumes; signals that arrive while it is held are delivered again afterwards.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator

from . import procfs
from .kernel import ptrace, seccomp
from .kernel.arch import ARCH


class RemoteError(Exception):
    """The target cannot be traced or the injected call failed; the message says why."""


def check_traceable(pid: int) -> procfs.Stat:
    """Refuse targets that ptrace cannot hold, naming the reason."""
    try:
        stat = procfs.read_stat(pid)
        status = procfs.read_status(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise RemoteError(f"no process with pid {pid}") from None
    if stat.state in ("Z", "X"):
        raise RemoteError(f"pid {pid} has exited (zombie)")
    if stat.state in ("T", "t"):
        raise RemoteError(f"pid {pid} is stopped (state {stat.state}); resume it first")
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        raise RemoteError(f"pid {pid} is already traced by pid {tracer} (a debugger?); "
                          "injection needs ptrace")
    if pid == os.getpid():
        raise RemoteError("memsnap cannot track itself")
    return stat


def _find_syscall_insn(pid: int) -> int:
    """Address of a syscall instruction in the target: its vDSO first, then executable maps."""
    maps = procfs.read_maps(pid)
    candidates = [m for m in maps if m.path == "[vdso]"] + [m for m in maps if "x" in m.perms]
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for m in candidates:
            try:
                code = os.pread(mem.fileno(), min(m.size, 1 << 20), m.start)
            except OSError:
                continue
            at = code.find(ARCH.syscall_insn)
            if at >= 0:
                return m.start + at
    raise RemoteError(f"no syscall instruction found in pid {pid}'s executable mappings")


def _pick_thread(pid: int) -> int:
    """The leader if it still runs, else any live thread (a leader may exit before others)."""
    for tid in procfs.threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("Z", "X"):
            return tid
    raise RemoteError(f"pid {pid} has no live thread")


class Session:
    """One seized and interrupted thread of a target; use as a context manager."""

    def __init__(self, pid: int):
        if not ARCH.can_inject:
            raise RemoteError(f"syscall injection is not implemented on {ARCH.name}")
        check_traceable(pid)
        self.pid = pid
        self.tid = _pick_thread(pid)
        self._insn = _find_syscall_insn(pid)
        self._saved = ARCH.regs_type()
        self._pending: list[int] = []
        self._attached = False

    def __enter__(self) -> Session:
        try:
            ptrace.seize(self.tid)
        except PermissionError:
            raise RemoteError(f"not permitted to trace pid {self.pid}: needs root or "
                              "CAP_SYS_PTRACE (and a ptrace_scope that allows it)") from None
        except ProcessLookupError:
            raise RemoteError(f"pid {self.pid} exited") from None
        self._attached = True
        ptrace.interrupt(self.tid)
        self._wait_for(lambda sig, event: event == ptrace.PTRACE_EVENT_STOP,
                       lambda: ptrace.cont(self.tid))
        ptrace.get_regs(self.tid, self._saved)
        return self

    def __exit__(self, *exc) -> None:
        if not self._attached:
            return
        self._attached = False
        with contextlib.suppress(ProcessLookupError):
            ptrace.set_regs(self.tid, self._saved)
            ptrace.detach(self.tid, self._pending.pop(0) if self._pending else 0)
            for sig in self._pending:  # more than one arrived while held: send the rest again
                os.kill(self.pid, sig)

    def _wait_for(self, done, resume) -> None:
        """Wait for the stop that `done(sig, event)` accepts.

        Signals meant for the target are taken off it and kept for detach; `resume` lets the
        thread go on towards the stop we want.
        """
        while True:
            sig, event = ptrace.wait_stop(self.tid)
            if done(sig, event):
                return
            if event == 0:
                self._pending.append(sig)
            resume()

    def call(self, name: str, *args: int) -> int:
        """Run one syscall in the target and return its raw result (-errno on failure)."""
        regs = ARCH.regs_type.from_buffer_copy(self._saved)
        ARCH.prepare_call(regs, self._insn, ARCH.nr[name], args)
        ptrace.set_regs(self.tid, regs)
        ptrace.singlestep(self.tid)
        self._wait_for(lambda sig, event: sig == signal.SIGTRAP and event == 0,
                       lambda: ptrace.singlestep(self.tid))
        ptrace.get_regs(self.tid, regs)
        if ARCH.pc(regs) != self._insn + len(ARCH.syscall_insn):
            raise RemoteError(f"injected {name} in pid {self.pid} did not complete")
        return ARCH.result(regs)

    def check_call(self, name: str, *args: int) -> int:
        result = self.call(name, *args)
        if result < 0:
            raise OSError(-result, f"{name} in pid {self.pid}: {os.strerror(-result)}")
        return result

    def seccomp_verdict(self, name: str, *args: int) -> int:
        """What the target's seccomp filters would do with this call (RET_ALLOW if none)."""
        if procfs.read_status(self.pid).get("Seccomp", "0") == "0":
            return seccomp.RET_ALLOW
        programs = []
        try:
            while (program := ptrace.seccomp_filter(self.tid, len(programs))) is not None:
                programs.append(program)
        except OSError as exc:
            if exc.errno == errno.EINVAL and procfs.read_status(self.pid).get("Seccomp") == "1":
                return seccomp.RET_KILL_PROCESS  # strict mode: only read/write/exit/sigreturn
            raise RemoteError(f"cannot read pid {self.pid}'s seccomp filters: {exc.strerror}") from None
        data = seccomp.seccomp_data(ARCH.nr[name], seccomp.AUDIT_ARCH[ARCH.name], self._insn, args)
        try:
            return seccomp.verdict(programs, data)
        except seccomp.CannotEvaluate as exc:
            raise RemoteError(f"cannot evaluate pid {self.pid}'s seccomp filter ({exc})") from None


@contextlib.contextmanager
def frozen_threads(pid: int) -> Iterator[list[int]]:
    """Hold every thread of pid in a ptrace stop for the duration of the block.

    Invisible to the target but for time: interrupted syscalls restart on detach.
    """
    check_traceable(pid)
    held: list[int] = []
    try:
        for _ in range(3):  # threads created while we seize: go round again
            new = [t for t in procfs.threads_or_empty(pid) if t not in held]
            if not new:
                break
            for tid in new:
                try:
                    ptrace.seize(tid)
                except ProcessLookupError:
                    continue
                held.append(tid)
                ptrace.interrupt(tid)
                ptrace.wait_stop(tid)
        yield held
    finally:
        for tid in held:
            with contextlib.suppress(ProcessLookupError):
                ptrace.detach(tid)
