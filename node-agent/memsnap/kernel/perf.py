"""perf_event_open(2) counters on trace events: how often a task hit a tracepoint.

A counter opened on a thread with `inherit` also counts in the threads and processes it
creates afterwards; reading it sums them all. Counting needs no ring buffer and no sample
records, so a counter costs the task a few nanoseconds per hit and nothing otherwise.
"""
from __future__ import annotations

import ctypes
import os

from . import libc, tracefs
from .arch import ARCH

PERF_TYPE_TRACEPOINT = 2
PERF_ATTR_SIZE_VER0 = 64
_INHERIT = 1 << 1  # perf_event_attr.flags bit 1
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_SET_FILTER = libc.iow(ord("$"), 6, ctypes.sizeof(ctypes.c_void_p))


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER0 (include/uapi/linux/perf_event.h);
    the kernel takes the older, shorter layout as it is."""

    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32),
                ("config1", ctypes.c_uint64)]


assert ctypes.sizeof(PerfEventAttr) == PERF_ATTR_SIZE_VER0


class TracepointCounter:
    """Hits of trace event system:name by thread tid (as this process's pid namespace names it)
    and, from now on, by everything it creates; with filter (tracefs filter syntax on the
    event's fields), only the hits that match."""

    def __init__(self, system: str, name: str, tid: int, filter: str | None = None):
        attr = PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=PERF_ATTR_SIZE_VER0,
                             config=tracefs.event_id(system, name), flags=_INHERIT)
        self.fd = libc.syscall(ARCH.nr["perf_event_open"], ctypes.addressof(attr), tid, -1, -1,
                               PERF_FLAG_FD_CLOEXEC, what=f"perf_event_open {system}:{name} on {tid}")
        try:
            if filter:
                raw = ctypes.create_string_buffer(filter.encode())
                libc.ioctl(self.fd, PERF_EVENT_IOC_SET_FILTER, raw, f"filter {filter!r} on {system}:{name}")
        except BaseException:
            os.close(self.fd)
            raise

    def read(self) -> int:
        return int.from_bytes(os.read(self.fd, 8), "little")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
