"""The C library handle and a raw syscall() that raises OSError like the os module does."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ioctl.restype = ctypes.c_int
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class IoVec(ctypes.Structure):
    """struct iovec."""

    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def check(result: int, what: str) -> int:
    """Raise OSError(errno) for a -1 result, naming the call."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def syscall(nr: int, *args: int, what: str = "syscall") -> int:
    return check(libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)), what)


def ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.Array, what: str) -> int:
    return check(libc.ioctl(fd, request, ctypes.addressof(arg)), what)


def mount(source: str | None, target: str | os.PathLike, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    enc = lambda s: None if s is None else str(s).encode()  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {fstype or source} on {target}")


MNT_DETACH = 0x2


def umount(target: str | os.PathLike, flags: int = 0) -> None:
    check(libc.umount2(str(target).encode(), ctypes.c_int(flags)), f"umount {target}")


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def iow(kind: int, nr: int, size: int) -> int:
    return _ioc(1, kind, nr, size)


def iowr(kind: int, nr: int, size: int) -> int:
    return _ioc(3, kind, nr, size)


def ior(kind: int, nr: int, size: int) -> int:
    return _ioc(2, kind, nr, size)
