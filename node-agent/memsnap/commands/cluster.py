"""`memsnap cluster`: a Kubernetes 1.20 cluster on local nodes, without Docker.

The control plane runs on the host; containerd and a kubelet run in each node.

    memsnap cluster up [--nodes N] [--bare]   etcd, API server, controllers, scheduler; node-1..node-N Ready;
                                              memsnap installed by its chart (not with --bare)
    memsnap cluster install                   install or upgrade memsnap in the running cluster (code changed)
    memsnap cluster status [--json]           what runs and what does not, and why (exit 1 if unhealthy)
    memsnap cluster kubeconfig                print the admin kubeconfig's path (for kubectl --kubeconfig)
    memsnap cluster load IMAGE.tar            import a docker-archive or OCI layout into every node
    memsnap cluster down                      stop everything and remove what it left (idempotent)
    memsnap cluster build                     build (or find cached) the Kubernetes binaries; prints their dir
    memsnap cluster images                    build (or find cached) the memsnap image; prints its archive
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from memsnap.cli import UsageError
from memsnap.cluster import build as kbuild
from memsnap.cluster import chart, controlplane, images, lifecycle, state, worker
from memsnap.nodes.image import ImageError
from memsnap.nodes.runtime import NodeError


def register(subparsers) -> None:
    p = subparsers.add_parser("cluster", help="a Kubernetes cluster on local nodes: up, down, status, load",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[4:]))
    actions = p.add_subparsers(dest="cluster_action", required=True, metavar="ACTION")

    up = actions.add_parser("up", help="start the cluster")
    up.add_argument("--nodes", type=int, default=2, help="number of worker nodes (default 2)")
    up.add_argument("--bare", action="store_true", help="without memsnap (no chart, the nodes' own agents)")
    _operator_flags(up)
    up.set_defaults(func=_guarded(cmd_up))

    ins = actions.add_parser("install", help="install or upgrade memsnap (its chart) in the running cluster")
    _operator_flags(ins)
    ins.set_defaults(func=_guarded(cmd_install))

    st = actions.add_parser("status", help="what runs and why not")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_guarded(cmd_status))

    actions.add_parser("kubeconfig", help="print the admin kubeconfig path").set_defaults(func=_guarded(cmd_kubeconfig))

    ld = actions.add_parser("load", help="import an image archive into every node")
    ld.add_argument("archive", metavar="IMAGE.tar", type=Path)
    ld.set_defaults(func=_guarded(cmd_load))

    actions.add_parser("down", help="stop the cluster and clean up").set_defaults(func=_guarded(cmd_down))
    actions.add_parser("build", help="build the Kubernetes binaries").set_defaults(func=_guarded(cmd_build))
    actions.add_parser("images", help="build the memsnap image (agent, operator)").set_defaults(func=_guarded(cmd_images))


def _operator_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-operator", dest="operator", action="store_false",
                   help="install the operator's RBAC but run no operator (e.g. tests that run their own)")
    p.add_argument("--no-wait-operator", dest="wait_operator", action="store_false",
                   help="do not wait for the operator's Deployment to be available")


def _guarded(func):
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except lifecycle.BadRequest as exc:
            raise UsageError(str(exc)) from None
        except lifecycle.AlreadyUp as exc:
            print(f"memsnap cluster up: {exc}", file=sys.stderr)
            return 0
        except (lifecycle.ClusterError, kbuild.BuildError, controlplane.StartError, worker.WorkerError,
                NodeError, ImageError, images.ImageBuildError, chart.ChartError, OSError) as exc:
            print(f"memsnap cluster {args.cluster_action}: {exc}", file=sys.stderr)
            return 1
    return wrapper


def cmd_up(args: argparse.Namespace) -> int:
    lifecycle.up(args.nodes, bare=args.bare, operator=args.operator, wait_operator=args.wait_operator)
    print(state.ADMIN_KUBECONFIG)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    lifecycle.install(operator=args.operator, wait_operator=args.wait_operator)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    s = lifecycle.status()
    if args.json:
        print(json.dumps({**asdict(s), "healthy": s.healthy}, indent=2))
    elif not s.up:
        print("no cluster (memsnap cluster up starts one)")
    else:
        for name, what in {**s.components, **s.nodes}.items():
            print(f"{name:<24} {what}")
        print(f"{'memsnap':<24} {s.memsnap}")
        print(f"{'kubeconfig':<24} {s.kubeconfig}")
    return 0 if s.healthy else 1


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    if state.load() is None or not state.ADMIN_KUBECONFIG.is_file():
        raise lifecycle.BadRequest("no cluster is up (run `memsnap cluster up`)")
    print(state.ADMIN_KUBECONFIG)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    for node, names in lifecycle.load(args.archive).items():
        print(f"{node}: {', '.join(names) or '(no named image)'}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if not lifecycle.down():
        print("no cluster was up", file=sys.stderr)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    print(kbuild.ensure().path)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    image = images.ensure()
    print(f"{image.archive}\t{image.tag}")
    return 0


if __name__ == "__main__":
    from memsnap.cli import main
    sys.exit(main(["cluster", *sys.argv[1:]]))
