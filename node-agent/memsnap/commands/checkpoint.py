"""memsnap checkpoint / restore / chain: incremental checkpoints of a running process."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..checkpoint import criu_chain, engine, final, precopy
from ..checkpoint.criu import CriuError
from ..checkpoint.freezer import FreezeError
from ..checkpoint.restore import restore
from ..images.pages_io import check_references
from ..errors import UsageError
from ..images import chain
from ..images.layer import LayerError
from ..tracking import TrackingError

FAILURES = (CriuError, FreezeError, LayerError, TrackingError, OSError)


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="write the next layer of a process's checkpoint chain")
    p.add_argument("--pid", type=int, required=True, help="the process (its descendants come along)")
    p.add_argument("--dir", type=Path, required=True, help="the new layer's directory (must not exist)")
    p.add_argument("--parent", type=Path, help="the previous layer (omit for the first, full one)")
    p.add_argument("--final", action="store_true",
                   help="freeze, dump with CRIU and stop the process once the dump has succeeded")
    p.add_argument("--backend", default="auto", help="tracking backend for pre-copy layers")
    p.add_argument("--engine", default="auto",
                   help="auto, memsnap (memsnap's tracker) or criu (CRIU's soft-dirty tracking)")
    p.set_defaults(func=run_checkpoint)

    r = sub.add_parser("restore", help="restore the process a chain of layers ends with")
    r.add_argument("--dir", type=Path, required=True, help="the final layer")
    r.set_defaults(func=run_restore)

    c = sub.add_parser("chain", help="inspect, verify, flatten or prune a checkpoint chain")
    c.add_argument("action", choices=["show", "verify", "flatten", "prune"])
    c.add_argument("--dir", type=Path, required=True, help="the newest layer")
    c.add_argument("--to", type=Path, help="flatten: where to write the single layer")
    c.add_argument("--keep", type=int, help="prune: layers to keep at most")
    c.add_argument("--max-bytes", type=int, help="prune: bytes to keep at most")
    c.set_defaults(func=run_chain)


def run_checkpoint(args) -> int:
    if args.parent is not None and not args.parent.is_dir():
        raise UsageError(f"--parent {args.parent} is not a layer directory")
    try:
        choice = engine.choose(args.engine)
        if choice.engine == "criu":
            layer = criu_chain.write(args.pid, args.dir, args.parent, args.final)
        elif args.final:
            layer = final.write(args.pid, args.dir, args.parent)
        else:
            layer = precopy.write(args.pid, args.dir, args.parent, args.backend)
    except engine.EngineError as exc:
        raise UsageError(str(exc)) from None
    except ProcessLookupError as exc:  # the target exited under a procfs read
        return _fail("checkpoint", f"pid {args.pid}'s tree lost a process ({exc}); "
                                   "no layer was written and the chain is as it was")
    except FAILURES as exc:
        return _fail("checkpoint", exc)
    m = chain.load(layer, verify=False)[0].manifest
    print(json.dumps(dict(_summary(layer, m), engine=choice.engine, engine_why=choice.why,
                          phases=m.phases, seconds=m.seconds)))
    return 0


def run_restore(args) -> int:
    try:
        print(json.dumps(restore(args.dir)))
    except FAILURES as exc:
        return _fail("restore", exc)
    return 0


def run_chain(args) -> int:
    try:
        if args.action == "flatten":
            if args.to is None:
                raise UsageError("flatten needs --to DIR")
            print(json.dumps({"dir": str(chain.flatten(args.dir, args.to))}))
        elif args.action == "prune":
            if args.keep is None and args.max_bytes is None:
                raise UsageError("prune needs --keep N and/or --max-bytes N")
            removed = chain.prune(args.dir, args.keep, args.max_bytes)
            print(json.dumps({"removed": [str(p) for p in removed]}))
        else:
            layers = chain.load(args.dir)
            if args.action == "verify":
                check_references(layers)
            for layer in layers:
                m = layer.manifest
                print(json.dumps(dict(_summary(layer.dir, m), created=m.created)))
    except FAILURES as exc:
        return _fail("chain", exc)
    return 0


def _summary(directory: Path, m) -> dict:
    """What a user reads about a layer, the same wherever a command prints one."""
    return {"dir": str(directory), "kind": m.kind, "pages": m.pages, "bytes": m.bytes,
            "described_pages": m.described_pages, "backend": m.backend,
            "freeze_seconds": m.freeze_seconds, "phases": m.phases}


def _fail(what: str, exc: Exception | str) -> int:
    print(f"memsnap {what}: {exc}", file=sys.stderr)
    return 1
