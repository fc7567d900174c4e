"""memsnap agent: the node agent. Tracks every pod process on this node and serves its dirty
rates as Prometheus metrics and a JSON API."""
from __future__ import annotations

import logging

from ..agent import config, logs

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
    # run_app turns SIGTERM and SIGINT into a graceful shutdown: the app's cleanup stops every session.
    web.run_app(make_app(cfg), host=cfg.listen_host, port=cfg.listen_port, print=None,
                access_log=None, shutdown_timeout=10)
    return 0
