"""Run every benchmark and print its table: python -m bench [--max-mib N] [--only NAME]."""
from __future__ import annotations

import argparse
import platform
import time

from memsnap.tracking.registry import explain

from . import accuracy, scan_cost, slowdown


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--max-mib", type=int, default=4096, help="largest region for the scan-cost benchmark")
    p.add_argument("--only", choices=["scan", "slowdown", "accuracy", "checkpoint", "backends", "freeze", "migration", "pause"])
    args = p.parse_args()
    backends = ", ".join(name for name, a in explain().items() if a.ok)
    print(f"# memsnap benchmarks, {time.strftime('%Y-%m-%d')}, Linux {platform.release()}, "
          f"backends here: {backends}\n")
    if args.only in (None, "scan"):
        print("## 1. read-and-rearm (uffd-wp + PAGEMAP_SCAN) vs hashing every page, 1 % written\n")
        print(scan_cost.run(args.max_mib), "\n")
    if args.only in (None, "slowdown"):
        print("## 2. workload slowdown, writing round a 256 MiB region\n")
        print(slowdown.run(), "\n")
    if args.only in (None, "accuracy"):
        print("## 3. accuracy on known write patterns\n")
        print(accuracy.run(), "\n")
    if args.only in (None, "backends"):
        from . import backends
        print("## 5. backends side by side\n")
        print(backends.run(), "\n")
    if args.only in (None, "checkpoint"):
        from . import checkpoint_cost  # needs local nodes (CRIU)
        print("## 4. incremental layers vs full CRIU dumps, 1 GiB workload, in a local node\n")
        print(checkpoint_cost.run(), "\n")
    if args.only in (None, "freeze"):
        from . import final_freeze  # needs local nodes (memsnap's CRIU)
        print("## 6. final checkpoint freeze by memory size, 1 %/s dirtied, in a local node\n")
        print(final_freeze.run(), "\n")
        print("the same, every size dirtying 10 MiB/s\n")
        print(final_freeze.run(fixed_rate=True), "\n")
    if args.only == "pause":
        from . import migration  # needs local nodes (CRIU, agents)
        from memsnap import nodes
        nodes.up(count=2)
        print("## 7c. migration pause by memory size (same pages/s) and the background fill's cost\n")
        print(migration.pause_by_size(), "\n")
    if args.only in (None, "migration"):
        from . import migration  # needs local nodes (CRIU, agents)
        print("## 7. live migration between two local nodes\n")
        print(migration.run(), "\n")


if __name__ == "__main__":
    main()
