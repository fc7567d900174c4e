"""Interfaces of the memsnap kernel patches (kernel/README.md): one module each.

- ``write_events``: mark, re-arm and unmark memory (madvise/process_madvise).
- ``tracefs``: a tracefs instance of our own that records the memsnap events.

No tracking policy here: only the kernel interface.
"""
