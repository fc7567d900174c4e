"""Per-architecture facts: syscall numbers, the syscall instruction, register layout.

x86_64 is implemented end to end. arm64 has uffd-wp too; its numbers are here, but remote
syscall injection (which needs NT_ARM_SYSTEM_CALL to cancel restarts) is not written yet.
"""
from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass


class UserRegsX86_64(ctypes.Structure):
    """struct user_regs_struct (arch/x86/include/asm/user_64.h)."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs")]


@dataclass(frozen=True)
class Arch:
    name: str
    syscall_insn: bytes
    nr: dict[str, int]
    regs_type: type[ctypes.Structure] | None

    @property
    def can_inject(self) -> bool:
        return self.regs_type is not None

    def prepare_call(self, regs: ctypes.Structure, at: int, nr: int, args: tuple[int, ...]) -> None:
        """Point regs at the syscall instruction `at` with the call set up."""
        if self.name != "x86_64":
            raise NotImplementedError(f"syscall injection on {self.name}")
        regs.rax = nr
        for reg, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, reg, value & 0xFFFFFFFFFFFFFFFF)
        regs.rip = at
        # orig_rax = -1 tells the kernel this stop is not inside a syscall, so leaving the
        # stop does not restart the syscall the thread was blocked in (it is restarted later,
        # when the original registers are put back).
        regs.orig_rax = 0xFFFFFFFFFFFFFFFF

    def result(self, regs: ctypes.Structure) -> int:
        value = regs.rax
        return value - (1 << 64) if value >= 1 << 63 else value

    def pc(self, regs: ctypes.Structure) -> int:
        return regs.rip


X86_64 = Arch(
    name="x86_64",
    syscall_insn=b"\x0f\x05",
    nr={"close": 3, "kcmp": 312, "userfaultfd": 323, "pidfd_open": 434, "pidfd_getfd": 438,
        "process_madvise": 440, "process_vm_readv": 310, "pivot_root": 155, "madvise": 28,
        "perf_event_open": 298, "mmap": 9, "munmap": 11, "brk": 12, "mremap": 25, "shmat": 30,
        "shmdt": 67, "execve": 59, "execveat": 322, "mlock": 149, "munlock": 150, "mlockall": 151,
        "munlockall": 152, "mlock2": 325, "prctl": 157, "remap_file_pages": 216},
    regs_type=UserRegsX86_64,
)

AARCH64 = Arch(
    name="aarch64",
    syscall_insn=(0xD4000001).to_bytes(4, "little"),  # svc #0
    nr={"close": 57, "kcmp": 272, "userfaultfd": 282, "pidfd_open": 434, "pidfd_getfd": 438,
        "process_madvise": 440, "process_vm_readv": 270, "pivot_root": 41, "madvise": 233,
        "perf_event_open": 241, "mmap": 222, "munmap": 215, "brk": 214, "mremap": 216, "shmat": 196,
        "shmdt": 197, "execve": 221, "execveat": 281, "mlock": 228, "munlock": 229, "mlockall": 230,
        "munlockall": 231, "mlock2": 284, "prctl": 167, "remap_file_pages": 234},
    regs_type=None,
)

_BY_MACHINE = {"x86_64": X86_64, "aarch64": AARCH64, "arm64": AARCH64}


def current() -> Arch:
    machine = platform.machine()
    try:
        return _BY_MACHINE[machine]
    except KeyError:
        raise RuntimeError(f"memsnap does not support the {machine} architecture") from None


ARCH = current()
