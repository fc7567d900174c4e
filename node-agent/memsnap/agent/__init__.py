"""The node agent (`memsnap agent`): discovery (pod processes from cgroups), pods (Kubernetes
API names and selection), tracker_pool (sessions within caps), metrics (Prometheus collector),
server (aiohttp endpoints and the cycle loop). docs/agent.md describes it."""
