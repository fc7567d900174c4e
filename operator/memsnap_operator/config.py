"""How an operator process is set up (from `memsnap operator`'s flags)."""
from __future__ import annotations

from dataclasses import dataclass

from memsnap import pki


@dataclass(frozen=True)
class OperatorConfig:
    kubeconfig: str | None  # None: in-cluster (service account)
    agent_tls: pki.TlsFiles  # the client identity "operator", from memsnap's CA
    agent_port: int = 9650
    metrics_listen: str | None = "0.0.0.0:9660"  # None: no metrics endpoint
    target_ready_timeout: float = 90.0  # s for the target pod's sandbox to exist
    poll_interval: float = 1.0  # s between progress reads from the source agent
    agent_silence: float = 30.0  # s without an answer from the source agent: give up, roll back
