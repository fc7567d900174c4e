"""userfaultfd(2) ioctls (include/uapi/linux/userfaultfd.h): API handshake, register, protect."""
from __future__ import annotations

import ctypes
import os

from . import arch
from .libc import ioctl, ior, iowr, syscall

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000

FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
FEATURE_WP_UNPOPULATED = 1 << 13
FEATURE_WP_ASYNC = 1 << 15

REGISTER_MODE_WP = 1 << 1
WRITEPROTECT_MODE_WP = 1 << 0


class Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class Register(ctypes.Structure):
    _fields_ = [("range", Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class WriteProtect(ctypes.Structure):
    _fields_ = [("range", Range), ("mode", ctypes.c_uint64)]


UFFDIO_API = iowr(UFFD_API, 0x3F, ctypes.sizeof(Api))
UFFDIO_REGISTER = iowr(UFFD_API, 0x00, ctypes.sizeof(Register))
UFFDIO_UNREGISTER = ior(UFFD_API, 0x01, ctypes.sizeof(Range))
UFFDIO_WRITEPROTECT = iowr(UFFD_API, 0x06, ctypes.sizeof(WriteProtect))

#: The features tracking needs: writes resolved by the kernel without a message (async), and
#: write-protection markers on pages that were never populated.
TRACKING_FEATURES = FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED


def create(flags: int = O_CLOEXEC | O_NONBLOCK) -> int:
    """A userfaultfd of the calling process (used to probe the kernel's features)."""
    return syscall(arch.ARCH.nr["userfaultfd"], flags, what="userfaultfd")


def api(fd: int, features: int) -> int:
    """The one-time handshake; returns the features the kernel supports."""
    arg = Api(UFFD_API, features, 0)
    ioctl(fd, UFFDIO_API, arg, "UFFDIO_API")
    return arg.features


def supported_features() -> int:
    fd = create()
    try:
        return api(fd, 0)
    finally:
        os.close(fd)


def register_wp(fd: int, start: int, end: int) -> None:
    ioctl(fd, UFFDIO_REGISTER, Register(Range(start, end - start), REGISTER_MODE_WP, 0),
          f"UFFDIO_REGISTER {start:#x}-{end:#x}")


def unregister(fd: int, start: int, end: int) -> None:
    ioctl(fd, UFFDIO_UNREGISTER, Range(start, end - start), f"UFFDIO_UNREGISTER {start:#x}-{end:#x}")


def write_protect(fd: int, start: int, end: int, protect: bool = True) -> None:
    """Protect [start, end), or with protect=False drop the protection (which also drops the
    markers on never-populated pages)."""
    ioctl(fd, UFFDIO_WRITEPROTECT, WriteProtect(Range(start, end - start), WRITEPROTECT_MODE_WP if protect else 0),
          f"UFFDIO_WRITEPROTECT {start:#x}-{end:#x}")
