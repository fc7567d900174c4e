"""The PodMigration as typed values: its spec (validated by the CRD schema first) and the
request the source agent gets."""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping

from .constants import GROUP, VERSION

MIB = 1 << 20
_SUFFIX = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
           "E": 10**18, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([a-zA-Z]*)")


def quantity(value: int | float | str) -> float:
    """A Kubernetes quantity ("64Mi", "1G", 500) as a number."""
    text = str(value).strip()
    match = _QUANTITY.fullmatch(text)
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"{value!r} is not a quantity (e.g. 64Mi, 1G, 500)")
    try:
        return float(Decimal(match.group(1)) * _SUFFIX[match.group(2)])
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a quantity") from None


@dataclass(frozen=True)
class Policy:
    """spec.policy; defaults as the CRD's (KubeVirt's, with QEMU's 300 ms downtime)."""

    max_downtime_ms: int = 300
    bandwidth_bytes_s: float = 0.0  # 0: no limit
    completion_timeout_per_gib: float = 150.0
    progress_timeout: float = 150.0
    auto_converge: bool = False

    @classmethod
    def from_spec(cls, policy: Mapping[str, Any] | None) -> Policy:
        p = policy or {}
        return cls(max_downtime_ms=int(p.get("maxDowntimeMs", 300)),
                   bandwidth_bytes_s=quantity(p.get("bandwidthPerMigration", 0)),
                   completion_timeout_per_gib=float(p.get("completionTimeoutPerGiB", 150)),
                   progress_timeout=float(p.get("progressTimeout", 150)),
                   auto_converge=bool(p.get("allowAutoConverge", False)))

    def agent_fields(self) -> dict[str, Any]:
        """The policy as the agent's migration engine names it (memsnap migrate's flags)."""
        return {"max_downtime_ms": self.max_downtime_ms, "bandwidth_mib_s": self.bandwidth_bytes_s / MIB,
                "completion_timeout_per_gib": self.completion_timeout_per_gib,
                "progress_timeout": self.progress_timeout, "auto_converge": self.auto_converge}


@dataclass(frozen=True)
class MigrationRef:
    """Which PodMigration, and what it asks for."""

    namespace: str
    name: str
    uid: str
    pod_name: str
    target_node: str | None
    policy: Policy
    from_checkpoint: str | None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> MigrationRef:
        meta, spec = body["metadata"], body.get("spec") or {}
        return cls(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], pod_name=spec["podName"],
                   target_node=spec.get("targetNode") or None, policy=Policy.from_spec(spec.get("policy")),
                   from_checkpoint=spec.get("fromCheckpoint") or None)

    @property
    def short_id(self) -> str:
        return self.uid.replace("-", "")[:5]

    def object_ref(self) -> dict[str, str]:
        """How events and owner references name it."""
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PodMigration", "name": self.name,
                "namespace": self.namespace, "uid": self.uid}


def target_pod_name(pod_name: str, short_id: str) -> str:
    """<pod>-mig-<id>, cut so it stays a valid pod name (253) and hostname-sized (63)."""
    return f"{pod_name[:63 - 10]}-mig-{short_id}"
