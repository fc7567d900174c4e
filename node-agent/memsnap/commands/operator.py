"""memsnap operator: the kopf operator for PodMigration (and PodCheckpoint) resources.

    memsnap operator [--kubeconfig PATH] [--tls-cert C --tls-key K --tls-ca CA] [--namespace NS]...

Kubernetes: --kubeconfig, else $KUBECONFIG, else in-cluster (service account).
Agents: mutual TLS as a client identity of memsnap's CA ("operator"): --tls-* (or
MEMSNAP_OPERATOR_TLS_CERT/_KEY/_CA, e.g. a mounted Secret's tls.crt, tls.key, ca.crt); without
them, on a host that holds memsnap's CA, the identity "operator" is issued from it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import pki
from ..errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("operator", help="run the operator (PodMigration, PodCheckpoint)",
                       description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(__doc__.splitlines()[2:]))
    env = os.environ.get
    p.add_argument("--kubeconfig", default=env("KUBECONFIG"), metavar="PATH",
                   help="kubeconfig file (default: $KUBECONFIG, else in-cluster)")
    p.add_argument("--tls-cert", default=env("MEMSNAP_OPERATOR_TLS_CERT"), type=Path, metavar="PATH")
    p.add_argument("--tls-key", default=env("MEMSNAP_OPERATOR_TLS_KEY"), type=Path, metavar="PATH")
    p.add_argument("--tls-ca", default=env("MEMSNAP_OPERATOR_TLS_CA"), type=Path, metavar="PATH")
    p.add_argument("--agent-port", type=int, default=int(env("MEMSNAP_OPERATOR_AGENT_PORT", "9650")),
                   metavar="PORT", help="where the node agents listen (default 9650)")
    p.add_argument("--metrics-listen", default=env("MEMSNAP_OPERATOR_METRICS_LISTEN", "0.0.0.0:9660"),
                   metavar="HOST:PORT", help="Prometheus /metrics (default 0.0.0.0:9660; 'none': off)")
    p.add_argument("--namespace", action="append", default=[], metavar="NS",
                   help="watch only this namespace (repeatable; default: all)")
    p.add_argument("--target-ready-timeout", type=float, default=90.0, metavar="SECONDS",
                   help="how long a target pod may take to get its sandbox (default 90)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)


def tls_files(args) -> pki.TlsFiles:
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(given) and not all(given):
        raise UsageError("--tls-cert, --tls-key and --tls-ca go together")
    if all(given):
        files = pki.TlsFiles(*given)
        for path in given:
            if not path.is_file():
                raise UsageError(f"{path}: no such file")
    else:
        try:
            files = pki.client_files("operator")
        except (pki.PkiError, OSError) as exc:
            raise UsageError(f"no agent client identity: pass --tls-cert/--tls-key/--tls-ca ({exc})") from None
    if pki.identity_of(files.cert.read_bytes()).is_node:
        raise UsageError(f"{files.cert} is a node certificate: the operator needs a client identity")
    return files


def run(args) -> int:
    from memsnap_operator.config import OperatorConfig
    from memsnap_operator.run import run as run_operator

    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        raise UsageError(f"--kubeconfig {args.kubeconfig}: no such file")
    if not args.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise UsageError("no Kubernetes: pass --kubeconfig (or set $KUBECONFIG), or run in a cluster")
    metrics = None if args.metrics_listen == "none" else args.metrics_listen
    if metrics and ":" not in metrics:
        raise UsageError(f"--metrics-listen {metrics}: HOST:PORT expected")
    config = OperatorConfig(kubeconfig=args.kubeconfig, agent_tls=tls_files(args), agent_port=args.agent_port,
                            metrics_listen=metrics, target_ready_timeout=args.target_ready_timeout)
    try:
        run_operator(config, namespaces=tuple(args.namespace), verbose=args.verbose)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    from ..cli import main
    sys.exit(main(["operator", *sys.argv[1:]]))
