"""spec.schedule: an interval such as 30s, 5m or 1h30m (the CRD's pattern), and when the next
checkpoint is due."""
from __future__ import annotations

import datetime
import re

INTERVAL = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
MIN_SECONDS = 5.0  # a checkpoint freezes the pod briefly: not more often than this


def interval_seconds(schedule: str) -> float:
    m = INTERVAL.match(schedule or "")
    if not m or not any(m.groups()):
        raise ValueError(f"spec.schedule {schedule!r} is not an interval such as 30s, 5m or 1h30m")
    h, mi, s = (int(g or 0) for g in m.groups())
    seconds = float(h * 3600 + mi * 60 + s)
    if seconds < MIN_SECONDS:
        raise ValueError(f"spec.schedule {schedule!r} is shorter than {MIN_SECONDS:.0f}s")
    return seconds


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def stamp(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def seconds_until_due(last: str | None, interval: float) -> float:
    """0 when a checkpoint is due now (none yet, or the interval has passed since the last)."""
    previous = parse_time(last)
    if previous is None:
        return 0.0
    return max(0.0, interval - (now() - previous).total_seconds())
