"""Tracking state kept under /run/memsnap, so a killed tracker's leftovers can be cleaned.

One JSON file and one lock file per target, named <pid>-<starttime>. The tracker holds an
exclusive flock on the lock file while it runs: a state file whose lock can be taken belongs
to nobody. "active" state without an owner is a killed tracker's, to be cleaned; "parked"
state is a target deliberately left armed between the layers of a checkpoint chain.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import procfs
from .base import TrackingError


def state_dir() -> Path:
    path = Path(os.environ.get("MEMSNAP_RUN_DIR", "/run/memsnap")) / "tracking"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except PermissionError:
        raise TrackingError(f"not permitted to write {path}: memsnap's tracker runs as root") from None
    return path


@dataclass
class TargetState:
    pid: int
    starttime: int
    backend: str
    mode: str = "active"  # or "parked"
    owner_pid: int = 0
    target_fd: int = -1  # the fd memsnap injected into the target, if any
    ranges: list[list[int]] = field(default_factory=list)  # tracked ranges, kept when parked
    pending: list[list[int]] = field(default_factory=list)  # collected, not yet saved
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.pid}-{self.starttime}"


class Claim:
    """Exclusive ownership of one target's tracking, held for the tracker's lifetime."""

    def __init__(self, pid: int, starttime: int):
        self.key = f"{pid}-{starttime}"
        self.pid = pid
        base = state_dir()
        self.path = base / f"{self.key}.json"
        self._lock_fd = os.open(base / f"{self.key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            owner = read(self.path)
            who = f" by memsnap pid {owner.owner_pid}" if owner else ""
            raise TrackingError(f"pid {pid} is already tracked{who}") from None

    def load(self) -> TargetState | None:
        return read(self.path)

    def save(self, state: TargetState) -> None:
        state.owner_pid = os.getpid() if state.mode == "active" else 0
        write_atomic(self.path, json.dumps(asdict(state)).encode())

    def release(self, keep_state: bool = False) -> None:
        if self._lock_fd < 0:
            return
        if not keep_state:
            self.path.unlink(missing_ok=True)
            (self.path.parent / f"{self.key}.lock").unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = -1


def read(path: Path) -> TargetState | None:
    try:
        return TargetState(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def unowned_states() -> list[tuple[Claim, TargetState]]:
    """States nobody holds, each with its claim taken (release it when done)."""
    found = []
    for path in sorted(state_dir().glob("*.json")):
        state = read(path)
        if state is None:
            continue
        try:
            claim = Claim(state.pid, state.starttime)
        except TrackingError:
            continue  # a live tracker owns it
        if not procfs.alive(state.pid, state.starttime):
            claim.release()  # the target is gone, and with it everything we had put in it
            continue
        found.append((claim, state))
    return found
