"""memsnap migrate: move a running process (a container and its tree) to another node's agent
while it runs, pausing it only for the last small delta.

Run it on the source node: it asks this node's agent (mutual TLS with the node's certificate)
to migrate, and prints the agent's progress. Exit 0 only when the workload runs on the target;
on any failure the workload runs on here, as it was.
"""
from __future__ import annotations

import asyncio
import json
import socket
import sys


from ..errors import UsageError
from ..migration.planner import Policy

MIB = 1 << 20


def register(sub) -> None:
    p = sub.add_parser("migrate", help="live-migrate a process to another node")
    p.add_argument("--pid", type=int, required=True, help="the process (its descendants come along)")
    p.add_argument("--to", required=True, metavar="NODE[:PORT]", help="the target node's agent")
    p.add_argument("--max-downtime-ms", type=int, default=Policy.max_downtime_ms,
                   help="pause budget (default 300)")
    p.add_argument("--bandwidth", type=float, default=0.0, metavar="MIB_PER_S",
                   help="cap on the link (default: unlimited)")
    p.add_argument("--completion-timeout-per-gib", type=float, default=Policy.completion_timeout_per_gib,
                   metavar="S", help="give up after S seconds per GiB of memory (default 150)")
    p.add_argument("--progress-timeout", type=float, default=Policy.progress_timeout, metavar="S",
                   help="give up after S seconds without progress (default 150)")
    p.add_argument("--auto-converge", action="store_true",
                   help="throttle the workload's CPU in growing steps when it dirties faster than the link")
    p.add_argument("--stop-and-copy", action="store_true",
                   help="no pre-copy: freeze, dump everything, copy, restore (to compare with)")
    p.add_argument("--agent", metavar="HOST:PORT", help="this node's agent (default: this host's name, port 9650)")
    p.add_argument("--json", action="store_true", help="one JSON object per round and a summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..migration import client  # needs cryptography: only when migrating
    try:
        policy = Policy(args.max_downtime_ms, args.bandwidth, args.completion_timeout_per_gib,
                        args.progress_timeout, args.auto_converge, not args.stop_and_copy).check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    body = {"pid": args.pid, "to": args.to, **policy.__dict__}
    agent = args.agent or socket.gethostname()  # this node's agent, on the agents' port
    try:
        return asyncio.run(_stream(client, agent, body, args.json))
    except client.ClientError as exc:
        print(f"memsnap migrate: {exc}", file=sys.stderr)
        return 1


async def _stream(client, agent: str, body: dict, as_json: bool) -> int:
    outcome = 1
    async for event in client.migrate(agent, body):
        kind = event.get("event")
        if as_json:
            print(json.dumps(event), flush=True)
        else:
            _show(event)
        if kind == "done":
            outcome = 0
        elif kind == "error":
            print(f"memsnap migrate: {event['error']} (the workload runs on here, as it was)", file=sys.stderr)
    return outcome


def _show(e: dict) -> None:
    kind = e.get("event")
    if kind == "start":
        print(f"migrating pid {e['pid']} from {e['source_node']} to {e['target_node']} (id {e['id']})")
    elif kind == "round":
        print(f"round {e['iteration']}: sent {e['bytes_sent'] / MIB:.1f} MiB ({e['dirty_pages']} pages), "
              f"dirtying {e['dirty_rate'] / MIB:.1f} MiB/s, link {e['bandwidth'] / MIB:.0f} MiB/s, "
              f"predicted pause {e['predicted_downtime_ms']:.0f} ms"
              + (f", throttled {e['throttle_percent']} %" if e.get("throttle_percent") else ""), flush=True)
    elif kind == "fill":
        print(f"filling in on the target: {e['filled_bytes'] / MIB:.0f} of {e['lazy_bytes'] / MIB:.0f} MiB "
              f"after {e['fill_seconds']:.0f} s (bound {e['bound_seconds']:.0f} s)", flush=True)
    elif kind == "done":
        phases = ", ".join(f"{k} {v:.0f}" for k, v in e["pause_phases"].items())
        print(f"done: runs on {e['target_node']} as pid {e['target_pid']}; paused {e['downtime_ms']:.0f} ms "
              f"({phases} ms); {e['iterations']} rounds, {e['transferred_bytes'] / MIB:.1f} MiB sent "
              f"of {e['memory_bytes'] / MIB:.1f} MiB in {e['total_seconds']:.1f} s", flush=True)



