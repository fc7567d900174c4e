"""Dirty-page tracking: which pages did a process write since the last look?

`open_session()` is the entry point; backends live in one module each.
"""
from .base import Availability, Backend, ProcessSample, TrackingError
from .pages import PageRanges
from .session import Round, TrackSession, open_session
from .vmas import DEFAULT_KINDS, VmaSelection

__all__ = ["Availability", "Backend", "DEFAULT_KINDS", "PageRanges", "ProcessSample", "Round",
           "TrackSession", "TrackingError", "VmaSelection", "open_session"]
