"""The agent's settings: flags, each with an environment variable (MEMSNAP_AGENT_<FLAG>) as
its default, so a DaemonSet can configure it either way."""
from __future__ import annotations

import argparse
import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from .. import pki
from ..errors import UsageError
from ..tracking import VmaSelection
from ..tracking.registry import NAMES

ENV_PREFIX = "MEMSNAP_AGENT_"
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


@dataclass
class Selection:
    """Which pods to track: every one, unless narrowed (all given filters must match)."""

    namespaces: list[str] = field(default_factory=list)
    label_selector: str = ""
    annotation: str = ""  # "key" or "key=value"

    @property
    def needs_metadata(self) -> bool:
        return bool(self.namespaces or self.label_selector or self.annotation)


@dataclass
class Config:
    listen_host: str = "0.0.0.0"
    listen_port: int = 9650
    interval: float = 10.0
    window: float = 60.0
    backend: str = "auto"
    vmas: VmaSelection = field(default_factory=VmaSelection)
    selection: Selection = field(default_factory=Selection)
    max_tracked_bytes: int = 0  # 0: no cap
    cpu_limit: float = 0.25  # of one core
    bandwidth: float = 1.25e9  # bytes/s a migration could use (the convergence alert's yardstick)
    token: str = ""
    tls: pki.TlsFiles | None = None  # mutual TLS on --listen when set
    metrics_listen: tuple[str, int] | None = None  # plain /metrics, /healthz, /readyz (with TLS)
    node_name: str = ""
    kubeconfig: str = ""  # "" : in-cluster config, then ~/.kube/config; "none": no API
    proc: str = "/proc"
    log_format: str = "json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = _env
    p.add_argument("--listen", default=env("LISTEN", "0.0.0.0:9650"), metavar="HOST:PORT",
                   help="address for /metrics, /healthz, /readyz and /api/v1 (default 0.0.0.0:9650)")
    p.add_argument("--interval", default=env("INTERVAL", "10"), metavar="SECONDS",
                   help="tracking round and discovery period (default 10)")
    p.add_argument("--window", default=env("WINDOW", "60"), metavar="SECONDS",
                   help="span of the writable working set (default 60)")
    p.add_argument("--backend", default=env("BACKEND", "auto"), help=f"one of {', '.join(NAMES)}")
    p.add_argument("--vmas", default=env("VMAS", "default"), metavar="KINDS",
                   help="VMA kinds to track (as for memsnap track; default: private writable memory)")
    p.add_argument("--namespace", action="append", default=_env_list("NAMESPACE"), metavar="NS",
                   help="track only pods in this namespace (repeatable)")
    p.add_argument("--selector", default=env("SELECTOR", ""), metavar="LABELS",
                   help="track only pods matching this label selector (k=v, k!=v, k, !k, k in (a,b))")
    p.add_argument("--annotation", default=env("ANNOTATION", ""), metavar="KEY[=VALUE]",
                   help="track only pods with this annotation (e.g. memsnap.io/track=true)")
    p.add_argument("--max-tracked-bytes", default=env("MAX_TRACKED_BYTES", "0"), metavar="SIZE",
                   help="cap on memory tracked on this node, e.g. 16Gi (default 0: no cap)")
    p.add_argument("--cpu-limit", default=env("CPU_LIMIT", "0.25"), metavar="CORES",
                   help="cap on the agent's own CPU use, in cores (default 0.25)")
    p.add_argument("--bandwidth", default=env("BANDWIDTH", "1.25G"), metavar="BYTES/S",
                   help="migration bandwidth for the convergence alert (default 1.25G = 10 Gbit/s)")
    p.add_argument("--token-file", default=env("TOKEN_FILE", ""), metavar="PATH",
                   help="bearer token protecting /api/v1 (or set MEMSNAP_AGENT_TOKEN)")
    p.add_argument("--tls-cert", default=env("TLS_CERT", ""), metavar="PATH",
                   help="this node's certificate: serve HTTPS with mutual TLS (with --tls-key, --tls-ca)")
    p.add_argument("--tls-key", default=env("TLS_KEY", ""), metavar="PATH", help="its private key")
    p.add_argument("--tls-ca", default=env("TLS_CA", ""), metavar="PATH",
                   help="the CA certificate that client certificates must be signed by")
    p.add_argument("--metrics-listen", default=env("METRICS_LISTEN", ""), metavar="HOST:PORT|none",
                   help="with TLS: plain HTTP for /metrics, /healthz, /readyz only "
                        "(default: the --listen host, port + 1)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME") or env("NODE_NAME", socket.gethostname()),
                   help="this node's name in the Kubernetes API (default $NODE_NAME, else the hostname)")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or env("KUBECONFIG", ""),
                   metavar="PATH", help="kubeconfig for pod names ('none': UIDs only; default: "
                                        "in-cluster config, else ~/.kube/config, else none)")
    p.add_argument("--log-format", default=env("LOG_FORMAT", "json"), choices=("json", "text"))


def from_args(args: argparse.Namespace) -> Config:
    host, port = parse_listen(args.listen)
    if args.backend not in NAMES:
        raise UsageError(f"unknown backend {args.backend!r} (choose from {', '.join(NAMES)})")
    try:
        vmas = VmaSelection.parse(args.vmas)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    cfg = Config(
        listen_host=host, listen_port=port,
        interval=_positive("--interval", args.interval),
        window=_positive("--window", args.window),
        backend=args.backend, vmas=vmas,
        selection=Selection(args.namespace, args.selector, args.annotation),
        max_tracked_bytes=int(parse_size(args.max_tracked_bytes, "--max-tracked-bytes")),
        cpu_limit=_positive("--cpu-limit", args.cpu_limit),
        bandwidth=parse_size(args.bandwidth, "--bandwidth"),
        token=_token(args.token_file), tls=_tls(args),
        node_name=args.node_name, kubeconfig=args.kubeconfig, log_format=args.log_format)
    cfg.metrics_listen = _metrics_listen(args.metrics_listen, cfg)
    if cfg.selection.label_selector:
        from .pods import parse_selector
        try:
            parse_selector(cfg.selection.label_selector)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return cfg


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"{flag} wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_size(text: str, flag: str) -> float:
    """'16Gi', '1.25G', '4096' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?)?[bB]?\s*", str(text))
    if not m:
        raise UsageError(f"{flag} wants a size like 512Mi or 1.25G, not {text!r}")
    return float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def _positive(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UsageError(f"{flag} must be a positive number, not {text!r}")
    return value


def _token(path: str) -> str:
    if path:
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --token-file {path}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"--token-file {path} is empty")
        return token
    return os.environ.get(ENV_PREFIX + "TOKEN", "").strip()


def _tls(args: argparse.Namespace) -> pki.TlsFiles | None:
    given = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise UsageError(f"TLS needs --tls-cert, --tls-key and --tls-ca; missing {', '.join(missing)}")
    files = pki.TlsFiles(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca))
    try:
        pki.server_context(files, require_client_cert=False)  # fail here, not at the first client
    except (pki.PkiError, ssl.SSLError) as exc:
        raise UsageError(str(exc)) from None
    return files


def _metrics_listen(text: str, cfg: Config) -> tuple[str, int] | None:
    if text == "none" or (not text and cfg.tls is None):
        return None  # without TLS the open routes are on --listen already
    if not text:
        return cfg.listen_host, (cfg.listen_port + 1) % 65536 if cfg.listen_port else 0
    if cfg.tls is None:
        raise UsageError("--metrics-listen is for TLS agents (without TLS, /metrics is on --listen)")
    return parse_listen(text, "--metrics-listen")


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_list(name: str) -> list[str]:
    return [v for v in os.environ.get(ENV_PREFIX + name, "").split(",") if v]
