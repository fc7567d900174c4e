"""A process that writes exactly the pages it is told to, for the guest tests.

It maps an anonymous region, prints its address, then obeys one command per
line on stdin and answers "ok <result>" on stdout:

  write P...        write one byte to each page index P
  mprotect P N RW   mprotect N pages from P (RW = r or rw)
  mremap NEWPAGES   move the region to a fresh hole (MREMAP_FIXED), resizing it
  dontneed P N      madvise(MADV_DONTNEED) N pages from P
  fork-write P...   fork; the child writes those pages and exits; wait for it
  spin P N          start a thread writing pages P..P+N-1 over and over
  cycles            how many full passes the spinning thread has made
  stop              stop the spinning thread
  munmap            unmap the region
  exec              answer, then exec sleep (the old address space goes away)
  exit              exit
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long)
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2

MAP_FAILED = ctypes.c_void_p(-1).value


def check(ok: bool, what: str) -> None:
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class Region:
    def __init__(self, pages: int, align: int):
        # Over-allocate and trim so the region is aligned (huge pages need 2 MiB).
        size, span = pages * PAGE, pages * PAGE + align
        raw = libc.mmap(None, span, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        check(raw != MAP_FAILED, "mmap")
        self.addr = (raw + align - 1) & ~(align - 1) if align > PAGE else raw
        if self.addr > raw:
            libc.munmap(raw, self.addr - raw)
        if raw + span > self.addr + size:
            libc.munmap(self.addr + size, raw + span - self.addr - size)
        self.pages = pages

    def write(self, pages: list[int]) -> None:
        for p in pages:
            ctypes.c_char.from_address(self.addr + p * PAGE).value = b"x"


class Spinner:
    """Writes a run of pages over and over, to race with re-arming."""

    def __init__(self, region: Region, first: int, count: int):
        self.cycles = 0
        self._stop = threading.Event()
        pages = list(range(first, first + count))

        def run() -> None:
            while not self._stop.is_set():
                region.write(pages)
                self.cycles += 1

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def serve(region: Region) -> None:
    spinner = None
    for line in sys.stdin:
        cmd, *args = line.split()
        nums = [int(a) for a in args if a.lstrip("-").isdigit()]
        result = ""
        if cmd == "write":
            region.write(nums)
        elif cmd == "mprotect":
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if args[2] == "rw" else 0)
            check(libc.mprotect(region.addr + nums[0] * PAGE, nums[1] * PAGE, prot) == 0,
                  "mprotect")
        elif cmd == "dontneed":
            check(libc.madvise(region.addr + nums[0] * PAGE, nums[1] * PAGE,
                               mmap.MADV_DONTNEED) == 0, "madvise")
        elif cmd == "mremap":
            hole = libc.mmap(None, nums[0] * PAGE, 0,  # PROT_NONE
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            check(hole != MAP_FAILED, "mmap")
            new = libc.mremap(region.addr, region.pages * PAGE, nums[0] * PAGE,
                              MREMAP_MAYMOVE | MREMAP_FIXED, hole)
            check(new != MAP_FAILED, "mremap")
            region.addr, region.pages = new, nums[0]
            result = hex(new)
        elif cmd == "fork-write":
            pid = os.fork()
            if pid == 0:
                region.write(nums)
                os._exit(0)
            os.waitpid(pid, 0)
            result = str(pid)
        elif cmd == "spin":
            spinner = Spinner(region, nums[0], nums[1])
        elif cmd == "cycles":
            result = str(spinner.cycles)
        elif cmd == "stop":
            spinner.stop()
        elif cmd == "munmap":
            check(libc.munmap(region.addr, region.pages * PAGE) == 0, "munmap")
        elif cmd == "exec":
            print("ok", flush=True)
            os.execv("/bin/sleep", ["sleep", "600"])
        elif cmd == "exit":
            print("ok", flush=True)
            return
        print("ok", result, flush=True)


def main() -> None:
    pages = int(sys.argv[1])
    align = int(sys.argv[2]) if len(sys.argv) > 2 else PAGE
    region = Region(pages, align)
    if align >= 2 << 20:
        check(libc.madvise(region.addr, pages * PAGE, mmap.MADV_HUGEPAGE) == 0, "madvise")
    print(hex(region.addr), flush=True)
    serve(region)


if __name__ == "__main__":
    main()
