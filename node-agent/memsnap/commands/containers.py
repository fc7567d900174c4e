"""`memsnap containers`: containers on this node (run inside a local node or a Kubernetes node).

    memsnap containers run [--name NAME] [--log [FILE]] -- CMD...   start CMD as a container; prints its pid
    memsnap containers list                                         name, pid, state, command
    memsnap containers stop NAME                                    kill it and remove its cgroups

From the host, `memsnap nodes run NODE -- CMD...` does the same inside NODE.
"""
from __future__ import annotations

import argparse
import secrets
from dataclasses import dataclass

from .. import containers
from ..errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("containers", help="containers on this node: run, list, stop",
                       description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(__doc__.splitlines()[2:]))
    actions = p.add_subparsers(dest="containers_action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="start a command as a container")
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)
    ls = actions.add_parser("list", help="list containers")
    ls.set_defaults(func=cmd_list)
    stop = actions.add_parser("stop", help="stop a container")
    stop.add_argument("name")
    stop.set_defaults(func=cmd_stop)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="container name (default: a random one)")
    p.add_argument("--log", nargs="?", const="", default=None, metavar="FILE",
                   help="stdout and stderr to FILE (default /var/log/memsnap/containers/NAME.log); "
                        "without --log they go to /dev/null")
    # After a positional, argparse's REMAINDER swallows the options too: run_spec() parses them.
    p.add_argument("spec", nargs=argparse.REMAINDER, metavar="-- CMD...")


@dataclass
class RunSpec:
    name: str
    log: str | None  # None: /dev/null; "": the default log file
    cmd: list[str]


def run_spec(args: argparse.Namespace) -> RunSpec:
    words = args.spec
    if "--" not in words:
        raise UsageError("no command given (usage: ... run [--name NAME] [--log [FILE]] -- CMD...)")
    cut = words.index("--")
    p = argparse.ArgumentParser(prog="run", add_help=False, exit_on_error=False)
    p.add_argument("--name", default=args.name)
    p.add_argument("--log", nargs="?", const="", default=args.log)
    try:
        opts = p.parse_args(words[:cut])
    except (argparse.ArgumentError, SystemExit) as exc:
        raise UsageError(f"bad run options {words[:cut]}: {exc}") from None
    if not words[cut + 1:]:
        raise UsageError("no command given after --")
    return RunSpec(opts.name or f"c-{secrets.token_hex(4)}", opts.log, words[cut + 1:])


def cmd_run(args: argparse.Namespace) -> int:
    spec = run_spec(args)
    try:
        c = containers.start(containers.check_name(spec.name), spec.cmd, spec.log)
    except containers.ContainerError as exc:
        raise UsageError(str(exc)) from None
    print(c.pid)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print(f"{'NAME':<20} {'PID':>8} {'STATE':<8} COMMAND")
    for c in containers.list_all():
        print(f"{c.name:<20} {c.pid:>8} {'running' if c.running else 'exited':<8} {' '.join(c.argv)}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    if containers.load(args.name) is None:
        raise UsageError(f"no container {args.name!r} on this node")
    containers.stop(args.name)
    return 0
