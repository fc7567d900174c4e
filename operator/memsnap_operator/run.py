"""Running the operator in this process (what `memsnap operator` does)."""
from __future__ import annotations

import asyncio
import logging

import kopf

from .config import OperatorConfig
from .handlers import REGISTRY


def run(config: OperatorConfig, *, namespaces: tuple[str, ...] = (), verbose: bool = False) -> None:
    """Serve PodMigrations until SIGINT/SIGTERM. One operator per cluster (standalone: no peering)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(kopf.operator(registry=REGISTRY, memo=kopf.Memo(config=config), standalone=True,
                              clusterwide=not namespaces, namespaces=namespaces))
