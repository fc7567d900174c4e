"""pidfd_open(2), pidfd_getfd(2) and kcmp(2): reaching into another process's fd table."""
from __future__ import annotations

from .arch import ARCH
from .libc import syscall

KCMP_FILE = 0


def pidfd_open(pid: int) -> int:
    return syscall(ARCH.nr["pidfd_open"], pid, 0, what=f"pidfd_open({pid})")


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate, in this process, of the target's file descriptor (same open file)."""
    return syscall(ARCH.nr["pidfd_getfd"], pidfd, target_fd, 0, what=f"pidfd_getfd(fd {target_fd})")


def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether two descriptors refer to the same open file (kcmp KCMP_FILE)."""
    return syscall(ARCH.nr["kcmp"], pid1, pid2, KCMP_FILE, fd1, fd2, what="kcmp") == 0
