"""When to stop pre-copying: the downtime prediction, convergence, and the timeouts.

Defaults follow KubeVirt and QEMU: 300 ms of downtime, unlimited bandwidth, 150 s per GiB to
complete, 150 s without progress. After each round the planner predicts the pause from what it
measured: the pages written since the last layer's dirty set was taken (dirty rate x the time
that layer took to write and send) over the link's bandwidth, plus the fixed cost of dumping
and restoring process state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

GIB = 1 << 30
MIB = 1 << 20

# QEMU's cpu-throttle-initial / -increment / maximum (percent of CPU taken away)
THROTTLE_INITIAL, THROTTLE_STEP, THROTTLE_MAX = 20, 10, 99
# Once the memory part of the predicted pause is this small, a state-dump floor above the
# budget is the pause: pre-copying longer cannot shorten it.
FLOOR_SLACK_MS, FLOOR_SLACK_SHARE = 10.0, 0.1
# A pause that fits the budget is still put off by another round while rounds shrink what is
# left to this share of the round before or less: a big workload's first rounds are long, so
# the round that first fits leaves several times what the rounds after it would (a 4 GiB
# workload froze on 14 MiB where a 256 MiB one at the same rate froze on 4 MiB).
SHRINKING = 0.5


@dataclass(frozen=True)
class Policy:
    max_downtime_ms: int = 300
    bandwidth_mib_s: float = 0.0  # 0: unlimited
    completion_timeout_per_gib: float = 150.0
    progress_timeout: float = 150.0
    auto_converge: bool = False
    precopy: bool = True  # False: stop-and-copy (one full dump while frozen), for comparison

    def check(self) -> Policy:
        if self.max_downtime_ms < 1:
            raise ValueError(f"max downtime must be at least 1 ms, got {self.max_downtime_ms}")
        if self.bandwidth_mib_s < 0:
            raise ValueError(f"bandwidth must be positive (MiB/s) or 0 for unlimited, got {self.bandwidth_mib_s}")
        if self.completion_timeout_per_gib <= 0 or self.progress_timeout <= 0:
            raise ValueError("timeouts must be positive")
        return self

    @property
    def bandwidth_bytes_s(self) -> float | None:
        return self.bandwidth_mib_s * MIB if self.bandwidth_mib_s else None


@dataclass
class Round:
    """What one pre-copy round measured."""

    iteration: int
    dirty_pages: int  # pages in this round's layer
    bytes_sent: int  # bytes of the layer's files
    collect_seconds: float  # from the previous collect to this one
    send_seconds: float  # sending the layer
    write_seconds: float = 0.0  # from this collect until the layer was written
    dirty_rate: float = 0.0  # bytes/s
    bandwidth: float = 0.0  # bytes/s, as measured on the link
    predicted_downtime_ms: float = 0.0
    remaining_bytes: int = 0  # what the next round would have to move, as predicted
    throttle_percent: int = 0

    def as_json(self) -> dict:
        return {"iteration": self.iteration, "bytes_sent": self.bytes_sent,
                "dirty_pages": self.dirty_pages, "dirty_rate": round(self.dirty_rate),
                "bandwidth": round(self.bandwidth), "remaining_bytes": self.remaining_bytes,
                "predicted_downtime_ms": round(self.predicted_downtime_ms, 1),
                "throttle_percent": self.throttle_percent}


@dataclass
class Decision:
    action: str  # "continue", "finalize", "fail"
    reason: str = ""
    throttle_percent: int = 0  # the CPU share to take away from the workload from now on


@dataclass
class Planner:
    policy: Policy
    memory_bytes: int
    fixed_cost_s: float  # measured cost of dumping and restoring process state
    started: float = field(default_factory=time.monotonic)
    rounds: list[Round] = field(default_factory=list)
    throttle: int = 0
    _best: float = float("inf")
    _best_at: float = field(default_factory=time.monotonic)
    _stalled: int = 0

    @property
    def completion_timeout(self) -> float:
        return self.policy.completion_timeout_per_gib * max(self.memory_bytes / GIB, 1 / 16)

    def observe(self, r: Round, now: float | None = None) -> Decision:
        """Record round r (filling in its rates and prediction) and decide what comes next."""
        now = time.monotonic() if now is None else now
        self._measure(r)
        self.rounds.append(r)
        if r.iteration == 0:  # the full copy: the dirty rate is measured from the next round on
            self._best_at = now  # and progress is judged from there
            return Decision("continue", "", self.throttle)
        floor_ms = self.fixed_cost_s * 1000
        slack = max(FLOOR_SLACK_MS, FLOOR_SLACK_SHARE * floor_ms)
        overdue = now - self.started > self.completion_timeout
        if r.predicted_downtime_ms <= self.policy.max_downtime_ms and (overdue or not self._still_shrinking(r, slack)):
            return Decision("finalize", f"predicted pause {r.predicted_downtime_ms:.0f} ms fits "
                            f"{self.policy.max_downtime_ms} ms", self.throttle)
        if floor_ms + slack > self.policy.max_downtime_ms and r.predicted_downtime_ms - floor_ms <= slack:
            # Memory is no longer what the pause is made of: more rounds cannot shorten it. The
            # floor need not exceed the budget: one that leaves less than the slack for memory
            # cannot be met either (a workload always dirties something while a round is sent).
            return Decision("finalize", f"the memory left moves in {r.predicted_downtime_ms - floor_ms:.0f} ms; "
                            f"dumping and restoring process state alone takes {floor_ms:.0f} ms here, "
                            f"{'over' if floor_ms > self.policy.max_downtime_ms else 'near'} the "
                            f"{self.policy.max_downtime_ms} ms budget", self.throttle)
        if overdue:
            return Decision("fail", f"did not converge within the completion timeout "
                            f"({self.completion_timeout:.0f} s for {self.memory_bytes / MIB:.0f} MiB); "
                            f"predicted pause {r.predicted_downtime_ms:.0f} ms > {self.policy.max_downtime_ms} ms"
                            + (f" at {self.throttle} % throttle" if self.throttle else ""))
        if r.remaining_bytes < self._best * 0.95:  # progress: the set to move still shrinks
            self._best, self._best_at, self._stalled = r.remaining_bytes, now, 0
        else:
            self._stalled += 1
        converging = self.policy.auto_converge and self.throttle < THROTTLE_MAX
        if now - self._best_at > self.policy.progress_timeout and not converging:
            return Decision("fail", f"no progress for {self.policy.progress_timeout:.0f} s (progress timeout): "
                            f"the workload dirties {r.dirty_rate / MIB:.1f} MiB/s, the link carries "
                            f"{r.bandwidth / MIB:.1f} MiB/s" + ("" if self.policy.auto_converge else
                                                                "; --auto-converge would throttle it")
                            + (f" (throttled {self.throttle} %)" if self.throttle else ""))
        if self.policy.auto_converge and self._stalled >= 1 and len(self.rounds) >= 2:
            self._step_throttle()
            self._stalled = 0
        r.throttle_percent = self.throttle
        return Decision("continue", "", self.throttle)

    def _still_shrinking(self, r: Round, slack_ms: float) -> bool:
        """Whether another round would likely leave much less to move while frozen: the memory
        part of the pause is more than the slack, and this round cut what is left to at most
        SHRINKING of what the round before left (the first round: of all memory)."""
        memory_ms = r.predicted_downtime_ms - self.fixed_cost_s * 1000
        before = self.rounds[-2].remaining_bytes if len(self.rounds) >= 2 else self.memory_bytes
        return memory_ms > slack_ms and r.remaining_bytes <= SHRINKING * before

    def _step_throttle(self) -> None:
        self.throttle = THROTTLE_INITIAL if not self.throttle else min(THROTTLE_MAX, self.throttle + THROTTLE_STEP)

    def _measure(self, r: Round) -> None:
        page = 4096
        first = r.iteration == 0
        r.dirty_rate = r.dirty_pages * page / r.collect_seconds if r.collect_seconds > 0 and not first else 0.0
        r.bandwidth = r.bytes_sent / r.send_seconds if r.send_seconds > 0 and r.bytes_sent else self._last_bandwidth()
        if self.policy.bandwidth_bytes_s:
            r.bandwidth = min(r.bandwidth or self.policy.bandwidth_bytes_s, self.policy.bandwidth_bytes_s)
        # Written since this layer's dirty set was taken, while it was written and sent: the
        # next (maybe final) delta.
        r.remaining_bytes = min(self.memory_bytes, int(r.dirty_rate * (r.write_seconds + r.send_seconds)))
        r.remaining_bytes = self.memory_bytes if first else max(r.remaining_bytes, page)
        link = r.bandwidth or float("inf")
        r.predicted_downtime_ms = (self.fixed_cost_s + r.remaining_bytes / link) * 1000

    def _last_bandwidth(self) -> float:
        return self.rounds[-1].bandwidth if self.rounds else 0.0

    def summary(self) -> dict:
        return {"iterations": len(self.rounds), "throttle_percent": self.throttle,
                "auto_converge": self.policy.auto_converge}
