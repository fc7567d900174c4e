"""The backends by name, choosing one for a target, and cleaning a killed tracker's leftovers."""
from __future__ import annotations

import os

from .base import Availability, Backend, TrackingError
from . import tracepoint
from .soft_dirty import SoftDirty
from .tracepoint import Tracepoint
from .state import unowned_states
from .uffd_wp import UffdWp, release_stale
from .vmas import VmaSelection

#: In order of preference for "auto": exact and freeze-free first.
BACKENDS: dict[str, type[Backend]] = {"uffd-wp": UffdWp, "tracepoint": Tracepoint, "soft-dirty": SoftDirty}
NAMES = ("auto", "uffd-wp", "soft-dirty", "tracepoint")


def availability(name: str) -> Availability:
    return BACKENDS[name].availability()


def explain() -> dict[str, Availability]:
    return {name: availability(name) for name in NAMES if name != "auto"}


def arm(pid: int, backend: str, selection: VmaSelection) -> tuple[Backend, object, str]:
    """Start tracking pid with the named backend, or the best one that works for "auto".

    Returns (backend, baseline pages, why this backend).
    """
    if backend not in NAMES:
        raise TrackingError(f"unknown backend {backend!r} (choose from {', '.join(NAMES)})")
    check_access(pid)
    candidates = list(BACKENDS) if backend == "auto" else [backend]
    reasons = []
    for name in candidates:
        avail = availability(name)
        if not avail.ok:
            reasons.append(f"{name}: {avail.reason}")
            continue
        tracker = BACKENDS[name](pid, selection)
        try:
            baseline = tracker.arm()
        except TrackingError as exc:
            if backend != "auto" or _fatal(exc):
                raise
            reasons.append(f"{name}: {exc}")
            continue
        why = avail.reason if not reasons else f"{avail.reason} (not: {'; '.join(reasons)})"
        return tracker, baseline, why
    raise TrackingError("no backend can track pid %d: %s" % (pid, "; ".join(reasons)))


def parked_backend(pid: int) -> str | None:
    """The backend a checkpoint chain left pid armed with, if any."""
    from .. import procfs
    from .state import read, state_dir
    started = procfs.starttime_or_none(pid)
    if started is None or not procfs.alive(pid, started):
        return None  # exited (a shell's short-lived child may go at any time)
    state = read(state_dir() / f"{pid}-{started}.json")
    return state.backend if state and state.mode == "parked" else None


def resume(pid: int, selection: VmaSelection) -> Backend:
    name = parked_backend(pid)
    if name is None or name not in BACKENDS:
        raise TrackingError(f"pid {pid} is not parked by a checkpoint chain")
    return BACKENDS[name].resume(pid, selection)


def check_access(pid: int) -> None:
    """Every backend reads the target's page tables: fail early, and say why, if we may not."""
    try:
        os.close(os.open(f"/proc/{pid}/pagemap", os.O_RDONLY))
    except FileNotFoundError:
        raise TrackingError(f"no process with pid {pid}") from None
    except PermissionError:
        raise TrackingError(f"not permitted to track pid {pid}: needs root, or CAP_SYS_PTRACE "
                            "over the target") from None


def _fatal(exc: TrackingError) -> bool:
    """Errors no other backend would get past."""
    text = str(exc)
    return text.startswith("no process") or "exited" in text or "already tracked" in text


_RELEASE = {UffdWp.name: release_stale, Tracepoint.name: tracepoint.release_stale}


def recover() -> list[str]:
    """Clean targets left armed by trackers that were killed; returns what was done."""
    done = []
    for claim, state in unowned_states():
        try:
            if state.mode == "active" and state.backend in _RELEASE:
                _RELEASE[state.backend](state)
                done.append(f"cleaned pid {state.pid} left armed by killed tracker {state.owner_pid}")
            if state.mode == "active":
                claim.release()
            else:
                claim.release(keep_state=True)  # parked on purpose: a chain will resume it
        except Exception:
            claim.release(keep_state=True)
            raise
    return done
