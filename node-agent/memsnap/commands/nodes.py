"""`memsnap nodes`: local nodes (Debian 13 roots with CRIU, own namespaces, veth on memsnap0).

    memsnap nodes up [--count N]      start node-1..node-N (default 2); builds the image if needed
    memsnap nodes down [NODE...]      stop nodes (default all) and remove everything they left
    memsnap nodes list                name, state, address, init PID, image
    memsnap nodes cp SRC NODE:DST     copy a host file or directory into a node
    memsnap nodes exec NODE -- CMD... run CMD in the node; stdio and exit code pass through
    memsnap nodes run NODE [--name NAME] [--log [FILE]] -- CMD...
                                      start CMD as a container in the node (own PID namespace and
                                      cgroup); prints its pid as the node sees it
"""
from __future__ import annotations

import argparse
import sys

from memsnap.cli import UsageError
from memsnap.commands.containers import add_run_arguments, run_spec
from memsnap.nodes import runtime
from memsnap.nodes.image import ImageError


def register(subparsers) -> None:
    p = subparsers.add_parser("nodes", help="local nodes: up, down, list, cp, exec",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[2:]))
    actions = p.add_subparsers(dest="nodes_action", required=True, metavar="ACTION")

    up = actions.add_parser("up", help="start node-1..node-N (idempotent)")
    up.add_argument("--count", type=int, default=2, help="number of nodes (default 2)")
    up.set_defaults(func=_guarded(cmd_up))

    down = actions.add_parser("down", help="stop nodes and clean up (idempotent)")
    down.add_argument("names", nargs="*", metavar="NODE", help="default: all nodes")
    down.set_defaults(func=_guarded(cmd_down))

    ls = actions.add_parser("list", help="list nodes")
    ls.set_defaults(func=_guarded(cmd_list))

    cp = actions.add_parser("cp", help="copy a host file or directory into a node")
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dst", metavar="NODE:DST")
    cp.set_defaults(func=_guarded(cmd_cp))

    ex = actions.add_parser("exec", help="run a command in a node")
    ex.add_argument("node", metavar="NODE")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    ex.set_defaults(func=_guarded(cmd_exec))

    rn = actions.add_parser("run", help="start a command as a container in a node")
    rn.add_argument("node", metavar="NODE")
    add_run_arguments(rn)
    rn.set_defaults(func=_guarded(cmd_run))


def _guarded(func):
    """Map runtime errors: the user's (unknown node, bad value) to UsageError, the system's to exit 1."""
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except runtime.BadNodeRequest as exc:
            raise UsageError(str(exc)) from None
        except (runtime.NodeError, ImageError, RuntimeError, OSError) as exc:
            print(f"memsnap nodes {args.nodes_action}: {exc}", file=sys.stderr)
            return 1
    return wrapper


def _table(nodes: list[runtime.Node]) -> None:
    print(f"{'NAME':<10} {'STATE':<8} {'ADDRESS':<14} {'PID':>8}  IMAGE")
    for n in nodes:
        state = "running" if n.running else "dead"
        print(f"{n.name:<10} {state:<8} {n.address:<14} {n.pid:>8}  {n.image}")


def cmd_up(args: argparse.Namespace) -> int:
    _table(runtime.up(args.count))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    for name in runtime.down(args.names):
        print(f"{name} down")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _table(runtime.list_nodes())
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    node, sep, dst = args.dst.partition(":")
    if not sep or not node or not dst:
        raise UsageError(f"destination must be NODE:/path, got {args.dst!r}")
    if not dst.startswith("/"):
        raise UsageError(f"path in the node must be absolute, got {dst!r}")
    runtime.copy_in(args.src, node, dst)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("no command given (usage: memsnap nodes exec NODE -- CMD...)")
    proc = runtime.popen(args.node, cmd)
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:  # the node's process got the SIGINT too: wait for it to exit
            continue
    return 128 - rc if rc < 0 else rc


def cmd_run(args: argparse.Namespace) -> int:
    """`memsnap containers run` inside the node: the node's own runtime starts it."""
    spec = run_spec(args)
    argv = ["memsnap", "containers", "run", "--name", spec.name]
    if spec.log is not None:
        argv += [f"--log={spec.log}"] if spec.log else ["--log"]
    return runtime.run(args.node, [*argv, "--", *spec.cmd]).returncode


def main(argv: list[str] | None = None) -> int:
    """`python -m memsnap.commands.nodes ACTION ...`: the same as `memsnap nodes ACTION ...`."""
    parser = argparse.ArgumentParser(prog="memsnap")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["nodes", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"memsnap nodes: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
