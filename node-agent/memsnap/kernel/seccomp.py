"""seccomp filters: evaluate a process's classic-BPF programs for one syscall.

Injecting a syscall that the target's seccomp filter kills on would kill the workload, so
memsnap asks the target's own filters first (read with PTRACE_SECCOMP_GET_FILTER).
"""
from __future__ import annotations

import struct

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

RET_ACTION_FULL = 0xFFFF0000
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000

ACTION_NAMES = {RET_KILL_PROCESS: "kill the process", RET_KILL_THREAD: "kill the thread",
                RET_TRAP: "raise SIGSYS", RET_ERRNO: "fail with an errno",
                RET_USER_NOTIF: "notify a supervisor", RET_TRACE: "notify a tracer",
                RET_LOG: "log and allow", RET_ALLOW: "allow"}

# Lower is more restrictive; with several filters the most restrictive answer wins.
_PRECEDENCE = [RET_KILL_PROCESS, RET_KILL_THREAD, RET_TRAP, RET_ERRNO, RET_USER_NOTIF,
               RET_TRACE, RET_LOG, RET_ALLOW]


class CannotEvaluate(Exception):
    """The filter uses an instruction this evaluator does not know."""


def seccomp_data(nr: int, arch: int, ip: int, args: tuple[int, ...]) -> bytes:
    padded = (tuple(a & 0xFFFFFFFFFFFFFFFF for a in args) + (0,) * 6)[:6]
    return struct.pack("<iIQ6Q", nr, arch, ip, *padded)


def run_filter(program: bytes, data: bytes) -> int:
    """Run one cBPF program (struct sock_filter[]) on seccomp_data; returns its verdict."""
    insns = [struct.unpack_from("<HBBI", program, off) for off in range(0, len(program), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    while pc < len(insns):
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if code == 0x20:                       # ld [k]
            a = struct.unpack_from("<I", data, k)[0]
        elif code == 0x00:                     # ld #k
            a = k
        elif code == 0x01:                     # ldx #k
            x = k
        elif code == 0x60:                     # ld M[k]
            a = mem[k]
        elif code == 0x61:                     # ldx M[k]
            x = mem[k]
        elif code == 0x02:                     # st M[k]
            mem[k] = a
        elif code == 0x03:                     # stx M[k]
            mem[k] = x
        elif code == 0x87:                     # tax
            x = a
        elif code == 0x8F:                     # txa
            a = x
        elif cls == 0x04:                      # alu
            a = _alu(code, a, x if code & 0x08 else k)
        elif code == 0x05:                     # ja
            pc += k
        elif cls == 0x05:                      # conditional jumps
            operand = x if code & 0x08 else k
            pc += jt if _test(code & 0xF0, a, operand) else jf
        elif code == 0x06:                     # ret #k
            return k
        elif code == 0x16:                     # ret a
            return a
        else:
            raise CannotEvaluate(f"cBPF opcode {code:#x}")
    raise CannotEvaluate("program ran off its end")


def _alu(code: int, a: int, v: int) -> int:
    op = code & 0xF0
    ops = {0x00: lambda: a + v, 0x10: lambda: a - v, 0x20: lambda: a * v,
           0x30: lambda: a // v if v else 0, 0x40: lambda: a | v, 0x50: lambda: a & v,
           0x60: lambda: a << v, 0x70: lambda: a >> v, 0x80: lambda: -a, 0x90: lambda: a % v if v else 0,
           0xA0: lambda: a ^ v}
    if op not in ops:
        raise CannotEvaluate(f"cBPF alu opcode {code:#x}")
    return ops[op]() & 0xFFFFFFFF


def _test(op: int, a: int, v: int) -> bool:
    tests = {0x10: a == v, 0x20: a > v, 0x30: a >= v, 0x40: bool(a & v)}
    if op not in tests:
        raise CannotEvaluate(f"cBPF jump opcode {op:#x}")
    return tests[op]


def verdict(programs: list[bytes], data: bytes) -> int:
    """The action (RET_* without data) that the stack of filters takes."""
    actions = [run_filter(p, data) & RET_ACTION_FULL for p in programs]
    return min(actions or [RET_ALLOW], key=lambda act: _PRECEDENCE.index(act) if act in _PRECEDENCE else 0)
