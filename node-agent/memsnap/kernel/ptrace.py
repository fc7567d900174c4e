"""ptrace(2): seize, interrupt, register access, single-step, detach.

The tracer is a thread, not a process: every call for one tracee must come from the thread
that seized it.
"""
from __future__ import annotations

import ctypes
import os

from .libc import IoVec, check, libc

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_DETACH = 17
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_EVENT_STOP = 128
NT_PRSTATUS = 1
WALL = 0x40000000  # __WALL: wait for clone children (non-leader threads) too

libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, tid: int, addr: int = 0, data: int = 0, what: str = "ptrace") -> int:
    return check(libc.ptrace(request, tid, addr, data), f"{what}({tid})")


def seize(tid: int) -> None:
    _ptrace(PTRACE_SEIZE, tid, what="PTRACE_SEIZE")


def interrupt(tid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, tid, what="PTRACE_INTERRUPT")


def singlestep(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_SINGLESTEP, tid, 0, sig, what="PTRACE_SINGLESTEP")


def detach(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_DETACH, tid, 0, sig, what="PTRACE_DETACH")


def get_regs(tid: int, regs: ctypes.Structure) -> None:
    iov = IoVec(ctypes.addressof(regs), ctypes.sizeof(regs))
    _ptrace(PTRACE_GETREGSET, tid, NT_PRSTATUS, ctypes.addressof(iov), what="PTRACE_GETREGSET")


def set_regs(tid: int, regs: ctypes.Structure) -> None:
    iov = IoVec(ctypes.addressof(regs), ctypes.sizeof(regs))
    _ptrace(PTRACE_SETREGSET, tid, NT_PRSTATUS, ctypes.addressof(iov), what="PTRACE_SETREGSET")


def wait_stop(tid: int) -> tuple[int, int]:
    """Wait for the tracee to stop; returns (stop signal, ptrace event).

    Raises ProcessLookupError if it exited or was killed instead.
    """
    _, status = os.waitpid(tid, WALL)
    if os.WIFSTOPPED(status):
        return os.WSTOPSIG(status), (status >> 16) & 0xFF
    raise ProcessLookupError(f"thread {tid} ended while being traced")


def seccomp_filter(tid: int, index: int) -> bytes | None:
    """The tracee's index-th seccomp cBPF program (8-byte instructions), None past the last."""
    count = libc.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, None)
    if count < 0:
        err = ctypes.get_errno()
        if err == 2:  # ENOENT: no such filter
            return None
        raise OSError(err, f"PTRACE_SECCOMP_GET_FILTER({tid}): {os.strerror(err)}")
    buf = ctypes.create_string_buffer(count * 8)
    check(libc.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf)),
          "PTRACE_SECCOMP_GET_FILTER")
    return buf.raw


def cont(tid: int, sig: int = 0) -> None:
    _ptrace(PTRACE_CONT, tid, 0, sig, what="PTRACE_CONT")
