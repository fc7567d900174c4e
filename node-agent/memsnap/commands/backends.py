"""memsnap backends: which tracking backends this node can run, and why not."""
from __future__ import annotations

from ..tracking.registry import explain


def register(sub) -> None:
    p = sub.add_parser("backends", help="say which tracking backends work on this kernel, and why")
    p.set_defaults(func=run)


def run(args) -> int:
    found = explain()
    for name, avail in found.items():
        print(f"{name:11} {'yes' if avail.ok else 'no ':3}  {avail.reason}")
    best = next((name for name, avail in found.items() if avail.ok), None)
    print(f"auto        -> {best or 'none'}")
    return 0 if best else 1
