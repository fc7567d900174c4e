"""memsnap demo: live dirty-page tracking, then an incremental checkpoint chain restored in a
local node, checked byte for byte."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .. import procfs, workload
from ..tracking import TrackingError, open_session

MIB = 1 << 20


def register(sub) -> None:
    p = sub.add_parser("demo", help="track a sample workload's dirty pages live for a few seconds")
    p.add_argument("--seconds", type=float, default=5.0, help="how long to watch (default 5)")
    p.add_argument("--rate", type=int, default=5000, help="pages/s the workload writes (default 5000)")
    p.add_argument("--no-nodes", action="store_true", help="skip the checkpoint part (needs local nodes)")
    p.set_defaults(func=run)


def run(args) -> int:
    status = run_tracking(args)
    if status == 0 and not args.no_nodes:
        from .. import demo_chain
        status = demo_chain.run()
    return status


def run_tracking(args) -> int:
    print("== 1. live dirty-page tracking")
    proc = subprocess.Popen([sys.executable, str(Path(workload.__file__)), "--mib", "256"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        print(f"workload pid {info['pid']}: {info['size'] // MIB} MiB region, writing "
              f"{args.rate} random pages/s")
        _send(proc, f"write 0 {info['size'] // info['page_size']}")  # populate it once
        _send(proc, f"churn {args.rate} {args.seconds + 2}")
        return _watch(info["pid"], args.seconds)
    finally:
        proc.kill()
        proc.wait()


def _send(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    proc.stdout.readline()


def _watch(pid: int, seconds: float) -> int:
    try:
        with open_session(pid) as session:
            baseline = session.start()[pid]
            print(f"tracking with {session.backend} ({session.why})")
            print(f"armed: {baseline.bytes / MIB:.1f} MiB hold data (what a first full dump would copy)")
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(1.0)
                r = session.round()
                print(f"  {r.dirty_pages / r.interval_seconds:8.0f} pages/s  "
                      f"{r.dirty_bytes / r.interval_seconds / MIB:7.2f} MiB/s dirty   "
                      f"{r.tracked_bytes / MIB:6.1f} MiB tracked   scan {r.scan_seconds * 1000:.2f} ms")
        fds = procfs.fds_pointing_to(pid, "anon_inode:[userfaultfd]")
        armed = [m for m, flags in procfs.read_vmflags(pid) if "uw" in flags]
        print(f"tracking stopped: the workload holds {len(fds)} userfaultfd and "
              f"{len(armed)} write-protected VMAs")
        return 0 if not fds and not armed else 1
    except TrackingError as exc:
        print(f"memsnap demo: {exc}", file=sys.stderr)
        return 1
