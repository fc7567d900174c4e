"""/metrics: a prometheus-client custom collector that renders the pool's latest Snapshot.

Nothing is accumulated here: every scrape reads one immutable snapshot, so a scrape never
sees half a cycle, and series of vanished containers simply stop. docs/metrics.md lists them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .config import Config
from .tracker_pool import SCAN_BUCKETS, Snapshot

LABELS = ["namespace", "pod", "container"]


class AgentCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot], cfg: Config, version: str):
        self.snapshot = snapshot
        self.cfg = cfg
        self.version = version

    def collect(self) -> Iterator:
        snap = self.snapshot()
        yield from self._per_container(snap)
        yield from self._node(snap)
        yield from self._agent(snap)

    def _per_container(self, snap: Snapshot) -> Iterator:
        rate = GaugeMetricFamily("memsnap_dirty_bytes_per_second",
                                 "Bytes written (pages dirtied x page size) per second in the last round",
                                 labels=LABELS)
        pages = CounterMetricFamily("memsnap_dirty_pages", "Pages dirtied since tracking began", labels=LABELS)
        tracked = GaugeMetricFamily("memsnap_tracked_bytes", "Bytes of memory under tracking", labels=LABELS)
        wss = GaugeMetricFamily("memsnap_writable_working_set_bytes",
                                "Distinct bytes written within the last --window seconds", labels=LABELS)
        procs = GaugeMetricFamily("memsnap_tracked_processes", "Processes under tracking", labels=LABELS)
        vmas = CounterMetricFamily("memsnap_vma_events", "Changes to the tracked VMAs, by kind",
                                   labels=[*LABELS, "event"])
        for c in snap.containers:
            labels = [c.namespace, c.pod, c.container]
            procs.add_metric(labels, c.tracked_processes)
            if not c.tracked_processes and not c.dirty_pages_total:
                continue  # only skipped processes: no numbers to show
            rate.add_metric(labels, c.dirty_bytes_per_second)
            pages.add_metric(labels, c.dirty_pages_total)
            tracked.add_metric(labels, c.tracked_bytes)
            wss.add_metric(labels, c.working_set_bytes)
            for event, n in sorted(c.vma_events.items()):
                vmas.add_metric([*labels, event], n)
        yield from (rate, pages, tracked, wss, procs, vmas)

    def _node(self, snap: Snapshot) -> Iterator:
        scan = HistogramMetricFamily("memsnap_scan_duration_seconds", "Time one process's tracking round took")
        bounds = ["+Inf" if b == float("inf") else repr(b) for b in SCAN_BUCKETS]
        scan.add_metric([], list(zip(bounds, snap.scan_buckets)), snap.scan_sum)
        errors = CounterMetricFamily("memsnap_tracking_errors", "Tracking failures, by reason", labels=["reason"])
        for reason, n in sorted(snap.errors.items()):
            errors.add_metric([reason], n)
        skipped = GaugeMetricFamily("memsnap_skipped_processes", "Pod processes not tracked now, by reason",
                                    labels=["reason"])
        for reason, n in sorted(snap.skipped.items()):
            skipped.add_metric([reason], n)
        backends = GaugeMetricFamily("memsnap_backend_processes", "Processes tracked, by tracking backend",
                                     labels=["backend"])
        for backend, n in sorted(snap.backends.items()):
            backends.add_metric([backend], n)
        total = GaugeMetricFamily("memsnap_node_tracked_bytes", "Bytes under tracking on this node",
                                  value=snap.tracked_bytes)
        limit = GaugeMetricFamily("memsnap_node_tracked_bytes_limit", "Cap on tracked bytes (0: none)",
                                  value=self.cfg.max_tracked_bytes)
        bandwidth = GaugeMetricFamily("memsnap_migration_bandwidth_bytes_per_second",
                                      "Configured migration bandwidth, the yardstick of convergence",
                                      value=self.cfg.bandwidth)
        yield from (scan, errors, skipped, backends, total, limit, bandwidth)

    def _agent(self, snap: Snapshot) -> Iterator:
        yield CounterMetricFamily("memsnap_agent_cpu_seconds", "CPU time the agent used (user + system)",
                                  value=snap.cpu_seconds)
        yield GaugeMetricFamily("memsnap_agent_cpu_limit_cores", "The agent's CPU cap, in cores",
                                value=self.cfg.cpu_limit)
        yield GaugeMetricFamily("memsnap_agent_cycle_seconds", "Wall time of the last discovery + tracking cycle",
                                value=snap.cycle_seconds)
        yield GaugeMetricFamily("memsnap_agent_interval_seconds", "Configured cycle period",
                                value=self.cfg.interval)
        yield CounterMetricFamily("memsnap_agent_cycles", "Discovery + tracking cycles completed",
                                  value=snap.cycles)
        info = GaugeMetricFamily("memsnap_agent_info", "The agent's version, node and Kubernetes API state",
                                 labels=["version", "node", "kube_api"])
        info.add_metric([self.version, self.cfg.node_name, "error" if snap.kube_api not in ("ok", "none")
                         else snap.kube_api], 1)
        yield info


def make_registry(snapshot: Callable[[], Snapshot], cfg: Config, version: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(snapshot, cfg, version))
    return registry
