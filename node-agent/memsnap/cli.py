"""The `memsnap` command line: one entry point, one module per subcommand.

Each module in COMMANDS exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed arguments, returns the exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from memsnap.errors import UsageError  # noqa: F401  (commands raise it from here)

COMMANDS = [
    "memsnap.commands.track",
    "memsnap.commands.untrack",
    "memsnap.commands.backends",
    "memsnap.commands.checkpoint",
    "memsnap.commands.nodes",
    "memsnap.commands.containers",
    "memsnap.commands.migrate",
    "memsnap.commands.cluster",
    "memsnap.commands.agent",
    "memsnap.commands.pki",
    "memsnap.commands.operator",
    "memsnap.commands.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memsnap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UsageError as exc:
        print(f"memsnap {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
