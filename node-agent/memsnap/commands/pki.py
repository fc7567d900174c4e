"""memsnap pki: certificates from memsnap's CA (on this host, made on first use) for agents and
clients elsewhere, e.g. the Secrets of a DaemonSet.

    memsnap pki node NAME --address IP --out DIR     DIR/tls.crt, tls.key, ca.crt for node NAME
    memsnap pki client NAME --out DIR                the same for a client identity (admin, operator)
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from .. import pki
from ..errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("pki", help="issue node and client certificates from memsnap's CA",
                       description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(__doc__.splitlines()[2:]))
    kinds = p.add_subparsers(dest="pki_kind", required=True, metavar="KIND")
    node = kinds.add_parser("node", help="a node's key and certificate (server and client)")
    node.add_argument("name", metavar="NAME")
    node.add_argument("--address", required=True, metavar="IP", help="the node's address (in the certificate)")
    client = kinds.add_parser("client", help="a client identity's key and certificate")
    client.add_argument("name", metavar="NAME")
    for k in (node, client):
        k.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write tls.crt, tls.key, ca.crt")
        k.set_defaults(func=run)


def run(args) -> int:
    try:
        pki.check_name(args.name)
        address = str(ipaddress.ip_address(args.address)) if args.pki_kind == "node" else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    files = pki.TlsFiles(args.out / "tls.crt", args.out / "tls.key", args.out / "ca.crt")
    try:
        ca = pki.CA.ensure()
        creds = ca.issue_node(args.name, address) if address else ca.issue_client(args.name)
        pki.write_credentials(creds, files, ca.cert_pem)
    except pki.PkiError as exc:
        print(f"memsnap pki: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"memsnap pki: cannot write {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(files.cert.parent)
    return 0
