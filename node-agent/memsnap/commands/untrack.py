"""memsnap untrack: end any tracking of a process and leave it clean, also after a crash."""
from __future__ import annotations

import sys

from ..tracking import TrackingError
from ..tracking.registry import recover
from ..tracking.state import Claim


def register(sub) -> None:
    p = sub.add_parser("untrack", help="leave a process (or every process) free of memsnap tracking")
    p.add_argument("--pid", type=int, help="the process (default: clean every target a dead tracker left)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.pid is not None:
        try:
            _unpark(args.pid)
        except TrackingError as exc:
            print(f"memsnap untrack: {exc}", file=sys.stderr)
            return 1
    for line in recover():
        print(line)
    return 0


def _unpark(pid: int) -> None:
    """A parked target (between checkpoint layers) becomes unowned active state: recover() cleans it."""
    from .. import procfs
    if not procfs.alive(pid):
        raise TrackingError(f"no process with pid {pid}")
    claim = Claim(pid, procfs.read_stat(pid).starttime)
    state = claim.load()
    if state is None:
        claim.release()
        return
    state.mode = "active"
    claim.save(state)
    claim.release(keep_state=True)
