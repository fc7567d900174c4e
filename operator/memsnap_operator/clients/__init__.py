"""The operator's only ways out: the Kubernetes API (kube) and the node agents (agents)."""
