"""memsnap agent: the node agent. Tracks every pod process on this node and serves its dirty
rates as Prometheus metrics and a JSON API."""
from __future__ import annotations

import logging
import resource
import socket
from typing import Callable

from .. import pki
from ..agent import config, logs
from ..tracking import TrackingError, registry

log = logging.getLogger("memsnap.agent")


def register(sub) -> None:
    p = sub.add_parser("agent", help="node agent: track pod processes, serve /metrics and a JSON API")
    config.add_arguments(p)
    p.set_defaults(func=run)


def run(args, extend: Callable | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT. extend(app), if given, adds routes before it starts
    (auth.add_routes with their kind)."""
    cfg = config.from_args(args)  # UsageError on bad flags, before anything starts
    logs.setup(cfg.log_format)
    from aiohttp import web

    from ..agent.server import make_app, serve_open_routes
    log.info("starting", extra={"listen": f"{cfg.listen_host}:{cfg.listen_port}", "interval": cfg.interval,
                                "backend": cfg.backend, "node": cfg.node_name,
                                "max_tracked_bytes": cfg.max_tracked_bytes, "cpu_limit": cfg.cpu_limit,
                                "api_token": bool(cfg.token), "tls": cfg.tls is not None,
                                "metrics_listen": "%s:%d" % cfg.metrics_listen if cfg.metrics_listen else None})
    _say_who_may_call(cfg)
    try:  # bind before anything else: a second agent on a taken address must not start tracking
        sock = _bind(cfg.listen_host, cfg.listen_port)
        plain = _bind(*cfg.metrics_listen) if cfg.metrics_listen else None
    except OSError as exc:
        return _fail(f"cannot listen on {exc.filename}: {exc.strerror or exc}")
    _raise_fd_limit()
    try:
        # A previous agent killed with SIGKILL may have left targets armed: clean them first.
        for action in registry.recover():
            log.info("recovered", extra={"action": action})
    except (TrackingError, OSError) as exc:  # e.g. not root: /run/memsnap is not ours
        return _fail(f"cannot recover tracking state: {exc}")
    app = make_app(cfg)
    if extend:
        extend(app)
    if plain:
        serve_open_routes(app, plain)
    tls = pki.server_context(cfg.tls, require_client_cert=False) if cfg.tls else None
    # run_app turns SIGTERM and SIGINT into a graceful shutdown: the app's cleanup stops every session.
    web.run_app(app, sock=sock, ssl_context=tls, print=None, access_log=None, shutdown_timeout=10)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        exc.filename = f"{host}:{port}"
        raise


def _say_who_may_call(cfg: config.Config) -> None:
    """The API's protection, at start: an operator must see an agent that answers only locally."""
    if cfg.tls:
        name = pki.identity_of(cfg.tls.cert.read_bytes()).name
        if name != cfg.node_name:
            log.warning(f"the TLS certificate names {name!r}, not this node {cfg.node_name!r}: "
                        f"clients that ask for {cfg.node_name!r} will refuse it")
    if not cfg.tls and not cfg.token:
        log.warning("neither TLS nor a token: /api/v1 answers on loopback only, calls that move "
                    "memory not at all (give --tls-cert/--tls-key/--tls-ca or --token-file)")


def _raise_fd_limit() -> None:
    """Each tracked process holds a few fds (userfaultfd, pagemap, pidfd): a node with
    thousands of pod processes would exceed the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("raised the open file limit", extra={"from": soft, "to": hard})


def _fail(message: str) -> int:
    log.error(message)
    return 1
