"""The operator's Prometheus metrics, served beside the agents' (docs/metrics.md)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

REGISTRY = CollectorRegistry()
PHASES = Counter("memsnap_operator_migrations_total", "PodMigrations that entered each phase", ["phase"],
                 registry=REGISTRY)
DOWNTIME = Histogram("memsnap_operator_migration_downtime_seconds",
                     "The pause of each succeeded migration, as the source agent measured it",
                     buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30), registry=REGISTRY)
DURATION = Histogram("memsnap_operator_migration_duration_seconds",
                     "From a PodMigration's start to its final phase",
                     buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800), registry=REGISTRY)


def serve(listen: str) -> None:
    """/metrics on HOST:PORT (a thread of prometheus_client's)."""
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=REGISTRY)


def entered(phase: str) -> None:
    PHASES.labels(phase=phase).inc()
