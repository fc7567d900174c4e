"""memsnap track: follow a process's dirty pages live, as a human view or JSON lines."""
from __future__ import annotations

import json
import signal
import sys
import time

from ..errors import UsageError
from ..tracking import Round, TrackingError, VmaSelection, open_session
from ..tracking.base import TargetGone
from ..tracking.registry import NAMES

MIB = 1 << 20


def register(sub) -> None:
    p = sub.add_parser("track", help="show which pages a process writes, live")
    p.add_argument("--pid", type=int, required=True, help="the process to track")
    p.add_argument("--tree", action="store_true", help="also track its descendants, new ones included")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="round length (default 1)")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long (default: until signalled)")
    p.add_argument("--backend", default="auto", help=f"one of {', '.join(NAMES)} (default auto)")
    p.add_argument("--vmas", default="default", metavar="KINDS",
                   help="VMA kinds to track: anon,heap,stack,file,shared-anon,shared-file, or all "
                        "(default: private writable memory)")
    p.add_argument("--json", action="store_true", help="one JSON object per round on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    selection = _validate(args)
    stop = _stop_on_signals()
    session = open_session(args.pid, args.backend, args.tree, selection)
    try:
        session.start()
    except TrackingError as exc:
        print(f"memsnap track: {exc}", file=sys.stderr)
        return 1
    show = _print_json if args.json else _HumanView(session.why).show
    try:
        for r in _rounds(session, args.interval, args.duration, stop):
            show(r)
        return 0
    except TargetGone as exc:
        if not args.json:
            print(f"memsnap track: {exc}; tracking ended", file=sys.stderr)
        return 0
    except TrackingError as exc:
        print(f"memsnap track: {exc}", file=sys.stderr)
        return 1
    finally:
        session.stop()


def _rounds(session, interval: float, duration: float | None, stop: _Stop):
    """Run a round every `interval` seconds (on a fixed grid, so rounds do not drift) until
    the duration is over or a signal came."""
    t0 = time.monotonic()
    deadline = t0 + duration if duration else float("inf")
    k = 1
    while True:
        due = t0 + k * interval
        if due > deadline + 1e-6:
            stop.wait(max(0.0, deadline - time.monotonic()))
            return
        if stop.wait(max(0.0, due - time.monotonic())):
            return
        yield session.round()
        k = max(k + 1, int((time.monotonic() - t0) / interval) + 1)  # skip rounds we overran


def _validate(args) -> VmaSelection:
    if args.backend not in NAMES:
        raise UsageError(f"unknown backend {args.backend!r} (choose from {', '.join(NAMES)})")
    if args.pid <= 0:
        raise UsageError(f"--pid must be a positive process id, not {args.pid}")
    if not args.interval > 0:
        raise UsageError(f"--interval must be positive, not {args.interval}")
    if args.duration is not None and not args.duration > 0:
        raise UsageError(f"--duration must be positive, not {args.duration}")
    try:
        return VmaSelection.parse(args.vmas)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class _Stop:
    """SIGINT and SIGTERM end tracking cleanly. They are blocked and waited for between rounds,
    so one can never land in the middle of a round (or of an injection into the target), and no
    handler runs at an awkward moment (an Event set from a handler can deadlock its waiter)."""

    SIGNALS = {signal.SIGINT, signal.SIGTERM}

    def __init__(self):
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        self.came = False

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if a stop signal came."""
        if not self.came and seconds > 0:
            self.came = signal.sigtimedwait(self.SIGNALS, seconds) is not None
        elif not self.came:
            self.came = bool(signal.sigpending() & self.SIGNALS)
        return self.came


def _stop_on_signals() -> _Stop:
    return _Stop()


def _print_json(r: Round) -> None:
    print(json.dumps(r.as_json()), flush=True)


class _HumanView:
    def __init__(self, why: str):
        self.header_due = True
        self.why = why

    def show(self, r: Round) -> None:
        if self.header_due:
            print(f"backend {r.backend}: {self.why}")
            print(f"{'time':8}  {'pages/s':>9}  {'MiB/s':>8}  {'tracked MiB':>11}  {'VMAs':>5}  {'scan ms':>7}  procs")
            self.header_due = False
        per_s = r.interval_seconds or 1.0
        print(f"{time.strftime('%H:%M:%S', time.localtime(r.time)):8}  {r.dirty_pages / per_s:9.0f}  "
              f"{r.dirty_bytes / per_s / MIB:8.2f}  {r.tracked_bytes / MIB:11.1f}  {r.vmas:5}  "
              f"{r.scan_seconds * 1000:7.2f}  {len(r.samples)}{'  (events lost: over-reported)' if any(s.lost for s in r.samples) else ''}")
        for s in r.samples:
            for e in s.events:
                size = (e.end - e.start) / MIB
                print(f"          pid {s.pid}: VMA {e.kind} {e.start:#x}-{e.end:#x} ({size:.2f} MiB) {e.path}")
        for pid in r.started:
            print(f"          pid {pid}: now tracked")
        for pid in r.ended:
            print(f"          pid {pid}: exited")
        sys.stdout.flush()
