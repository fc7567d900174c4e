"""memsnap agent: the node agent. Tracks every pod process on this node and serves its dirty
rates as Prometheus metrics and a JSON API."""
from __future__ import annotations

import logging
import resource
import socket

from ..agent import config, logs
from ..tracking import TrackingError, registry

log = logging.getLogger("memsnap.agent")


def register(sub) -> None:
    p = sub.add_parser("agent", help="node agent: track pod processes, serve /metrics and a JSON API")
    config.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config.from_args(args)  # UsageError on bad flags, before anything starts
    logs.setup(cfg.log_format)
    from aiohttp import web

    from ..agent.server import make_app
    log.info("starting", extra={"listen": f"{cfg.listen_host}:{cfg.listen_port}", "interval": cfg.interval,
                                "backend": cfg.backend, "node": cfg.node_name,
                                "max_tracked_bytes": cfg.max_tracked_bytes, "cpu_limit": cfg.cpu_limit,
                                "api_token": bool(cfg.token)})
    try:  # bind before anything else: a second agent on a taken address must not start tracking
        family = socket.AF_INET6 if ":" in cfg.listen_host else socket.AF_INET
        sock = socket.create_server((cfg.listen_host, cfg.listen_port), family=family)
    except OSError as exc:
        return _fail(f"cannot listen on {cfg.listen_host}:{cfg.listen_port}: {exc.strerror or exc}")
    _raise_fd_limit()
    try:
        # A previous agent killed with SIGKILL may have left targets armed: clean them first.
        for action in registry.recover():
            log.info("recovered", extra={"action": action})
    except (TrackingError, OSError) as exc:  # e.g. not root: /run/memsnap is not ours
        return _fail(f"cannot recover tracking state: {exc}")
    # run_app turns SIGTERM and SIGINT into a graceful shutdown: the app's cleanup stops every session.
    web.run_app(make_app(cfg), sock=sock, print=None, access_log=None, shutdown_timeout=10)
    return 0


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
