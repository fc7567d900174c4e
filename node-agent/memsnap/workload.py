"""A sample workload that writes exactly the pages it is told to: ground truth for tests,
benchmarks and the demo. Standard library only, so any python3 can run this file alone.

    python3 workload.py [--mib N] [--churn RATE] [--tcp]

prints one JSON line {"pid", "base", "size", "page_size"} and then answers commands on stdin,
one per line, each with one line on stdout ("ok ..." or "error ..."). With --churn it writes
RATE random pages/s from the start until SIGUSR1; at the end of stdin it idles on (so it can
run detached, e.g. to be checkpointed). --tcp runs the tcp command first.

    write FIRST COUNT [STRIDE]   write one byte into COUNT pages, from page FIRST
    threads FIRST COUNT N        the same, split over N threads running at once
    readinto FIRST COUNT         the kernel writes the pages (read() from a pipe)
    sleep SECONDS                block in a syscall, then answer
    churn RATE SECONDS           keep writing RATE random pages/s for SECONDS (in background)
    fork COUNT                   fork a child that rewrites COUNT pages every 50 ms; "ok PID"
    exec                         re-execute this program (a new image): a new JSON line follows
    checksum                     "ok HEX" of the whole region
    map PAGES                    map (and fill) a new private anonymous VMA: "ok ADDR"
    unmap                        unmap the VMA made by the last map
    grow PAGES                   mremap the last map to PAGES pages (in place or moved) and
                                 write every page: "ok ADDR"
    remap FIRST COUNT            mmap(MAP_FIXED) fresh memory over those pages of the region
                                 (the old VMA is replaced behind any tracker's back) and fill it
    seccomp-deny NAME ACTION     install a seccomp filter: syscall NAME gets errno|kill
    tcp                          open a TCP connection to itself on loopback (CRIU refuses to
                                 dump an established connection unless told to)
    bench SECONDS                write pages in a loop over the region for SECONDS: "ok PAGES"
    exit
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import random
import sys
import threading
import time

PAGE = mmap.PAGESIZE


def address_of(mem: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(mem)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # an mmap cannot be closed or resized while a buffer export is alive


class Region:
    def __init__(self, size: int):
        self.mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.size = size
        self.base = address_of(self.mem)
        self.counter = 0
        self.extra: list[mmap.mmap] = []
        self.extra_fds: list = []
        self.churning = threading.Event()

    def write(self, first: int, count: int, stride: int = 1) -> None:
        self.counter = (self.counter + 1) % 251
        for page in range(first, first + count * stride, stride):
            self.mem[page * PAGE] = self.counter + 1

    def readinto(self, first: int, count: int) -> None:
        r, w = os.pipe()
        try:
            view = memoryview(self.mem)[first * PAGE:(first + count) * PAGE]
            for off in range(0, len(view), PAGE):
                os.write(w, b"k" * PAGE)
                os.readv(r, [view[off:off + PAGE]])
            view.release()
        finally:
            os.close(r)
            os.close(w)


def write_for(region: Region, seconds: float) -> int:
    """Write one byte per page, page after page round the region; returns pages written."""
    pages, mem, written = region.size // PAGE, region.mem, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for page in range(0, pages, 1) if written == 0 else range(pages):
            mem[page * PAGE] = 1
            written += 1
            if written % 4096 == 0 and time.monotonic() >= end:
                return written
    return written


def churn(region: Region, rate: float, seconds: float) -> None:
    pages = region.size // PAGE
    end = time.monotonic() + seconds
    step = 0.01
    rng = random.Random(1)
    region.churning.set()
    while time.monotonic() < end and region.churning.is_set():
        for _ in range(max(1, int(rate * step))):
            region.mem[rng.randrange(pages) * PAGE] = 1
        time.sleep(step)


SYSCALLS = {"userfaultfd": 323, "close": 3}  # x86_64


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _seccomp_deny(nr: int, action: str) -> None:
    """A classic-BPF filter: `nr` gets EPERM ("errno") or kills the process ("kill")."""
    import struct
    ret = 0x00050000 | 1 if action == "errno" else 0x80000000
    prog = [(0x20, 0, 0, 0),        # ld [nr]
            (0x15, 0, 1, nr),       # jeq nr ? next : allow
            (0x06, 0, 0, ret),
            (0x06, 0, 0, 0x7FFF0000)]
    code = b"".join(struct.pack("<HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(code)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    libc = _libc()
    if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def child_loop(region: Region, count: int) -> None:
    sys.stdin.close()
    while True:
        region.write(0, count)
        time.sleep(0.05)


def handle(region: Region, words: list[str]) -> str:
    cmd = words[0]
    args = [] if cmd == "seccomp-deny" else [float(w) if "." in w else int(w) for w in words[1:]]
    if cmd == "write":
        region.write(*args)
    elif cmd == "threads":
        first, count, n = args
        per = count // n
        workers = [threading.Thread(target=region.write, args=(first + i * per, per if i < n - 1 else count - i * per))
                   for i in range(n)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    elif cmd == "readinto":
        region.readinto(*args)
    elif cmd == "sleep":
        started = time.monotonic()
        time.sleep(args[0])
        return f"ok {time.monotonic() - started:.3f}"
    elif cmd == "churn":
        threading.Thread(target=churn, args=(region, *args), daemon=True).start()
    elif cmd == "fork":
        pid = os.fork()
        if pid == 0:
            child_loop(region, args[0])
        return f"ok {pid}"
    elif cmd == "exec":
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    elif cmd == "map":
        extra = mmap.mmap(-1, args[0] * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        extra.write(b"m" * len(extra))
        region.extra.append(extra)
        return f"ok {address_of(extra)}"
    elif cmd == "grow":
        extra = region.extra[-1]
        extra.resize(args[0] * PAGE)
        for page in range(args[0]):
            extra[page * PAGE] = 0x67
        return f"ok {address_of(extra)}"
    elif cmd == "unmap":
        region.extra.pop().close()
    elif cmd == "remap":
        first, count = args
        addr = region.base + first * PAGE
        got = _libc().mmap(ctypes.c_void_p(addr), count * PAGE, 3, 0x32, -1, 0)  # RW, PRIVATE|ANON|FIXED
        if got != addr:
            return "error mmap"
        ctypes.memset(addr, 0x72, count * PAGE)
    elif cmd == "seccomp-deny":
        _seccomp_deny(SYSCALLS[words[1]], words[2])
        return "ok"
    elif cmd == "tcp":
        import socket
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        region.extra_fds += [server, client, server.accept()[0]]
    elif cmd == "bench":
        return f"ok {write_for(region, args[0])}"
    elif cmd == "checksum":
        return "ok " + hashlib.sha256(region.mem).hexdigest()
    elif cmd == "exit":
        sys.exit(0)
    else:
        return f"error unknown command {cmd}"
    return "ok"


def _option(name: str, default: float) -> float:
    return float(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def main() -> None:
    import signal
    region = Region(int(_option("--mib", 64)) << 20)
    print(json.dumps({"pid": os.getpid(), "base": region.base, "size": region.size, "page_size": PAGE}), flush=True)
    signal.signal(signal.SIGUSR1, lambda *_: region.churning.clear())
    if "--tcp" in sys.argv:
        handle(region, ["tcp"])
    if "--churn" in sys.argv:
        region.write(0, region.size // PAGE)
        threading.Thread(target=churn, args=(region, _option("--churn", 0), float("inf")), daemon=True).start()
    for line in sys.stdin:
        words = line.split()
        if words:
            print(handle(region, words), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
