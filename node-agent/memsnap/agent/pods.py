"""Pod names, namespaces, labels and container names from the Kubernetes API (this node's pods
only, listed then watched), when the agent has a kubeconfig or runs in a cluster; and the pod
selection rules."""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field

from .config import Selection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodMeta:
    uid: str
    namespace: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    containers: dict[str, str] = field(default_factory=dict)  # container ID -> container name


class PodDirectory:
    """This node's pods from the API server: listed once, then kept current by a watch (like a
    DaemonSet's informer); `lookup` answers from what it holds."""

    WATCH_SECONDS = 240  # the server ends each watch after this; we resume from the last version
    RETRY_SECONDS = 2.0

    def __init__(self, kubeconfig: str, node_name: str):
        self.node_name = node_name
        self.api = _connect(kubeconfig)
        self.pods: dict[str, PodMeta] = {}
        self.error = ""  # the last listing's or watch's failure, "" when it worked
        self.resource_version = ""  # where the watch resumes; "" = list first

    @property
    def available(self) -> bool:
        return self.api is not None

    def refresh(self) -> None:
        """List this node's pods (blocking: run it off the event loop)."""
        if self.api is None:
            return
        try:
            listing = self.api.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node_name}", _request_timeout=10)
        except Exception as exc:  # an unreachable API must not stop tracking: keep the last list
            self._failed("pod listing failed", exc)
            return
        self.pods = {p.metadata.uid: _meta(p) for p in listing.items}
        self.resource_version = listing.metadata.resource_version or ""
        self.error = ""

    def watch(self, stop: threading.Event) -> None:
        """Apply pod events until stop is set (blocking: run it in a thread of its own). After a
        failure or an expired version it lists again, so nothing is missed between watches."""
        from kubernetes import watch
        while not stop.is_set():
            if not self.resource_version:
                self.refresh()
                if not self.resource_version:
                    stop.wait(self.RETRY_SECONDS)
                    continue
            try:
                for event in watch.Watch().stream(
                        self.api.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={self.node_name}",
                        resource_version=self.resource_version, timeout_seconds=self.WATCH_SECONDS,
                        _request_timeout=self.WATCH_SECONDS + 10):
                    if stop.is_set():
                        return
                    self._apply(event["type"], event["object"])
            except Exception as exc:  # 410 Gone, a dropped connection, an API restart: list again
                self._failed("pod watch failed", exc)
                self.resource_version = ""
                stop.wait(self.RETRY_SECONDS)

    def _apply(self, kind: str, pod) -> None:
        if kind == "ERROR":  # the server said the version is too old
            self.resource_version = ""
            return
        self.resource_version = pod.metadata.resource_version or self.resource_version
        if kind == "DELETED":
            self.pods.pop(pod.metadata.uid, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.pods = {**self.pods, pod.metadata.uid: _meta(pod)}  # readers see old or new, whole
        self.error = ""

    def _failed(self, what: str, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning(what, extra={"error": self.error})

    def lookup(self, uid: str) -> PodMeta | None:
        return self.pods.get(uid)


def _connect(kubeconfig: str):
    """A CoreV1Api, or None when no cluster configuration exists (UIDs only)."""
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    home_config = os.path.exists(os.path.expanduser("~/.kube/config"))
    if kubeconfig == "none" or not (kubeconfig or in_cluster or home_config):
        return None  # no configuration: no need for the kubernetes package either (local nodes)
    from kubernetes import client, config
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)
        elif in_cluster:
            config.load_incluster_config()
        else:
            config.load_kube_config()
    except Exception as exc:
        log.warning("no Kubernetes API: pods are known by UID only", extra={"error": str(exc)})
        return None
    return client.CoreV1Api()


def _meta(pod) -> PodMeta:
    containers = {}
    status = pod.status
    for s in (status.container_statuses or []) + (status.init_container_statuses or []) \
            + (getattr(status, "ephemeral_container_statuses", None) or []):
        if s.container_id:  # "containerd://<id>", "cri-o://<id>"
            containers[s.container_id.rpartition("://")[2]] = s.name
    md = pod.metadata
    return PodMeta(md.uid, md.namespace, md.name, dict(md.labels or {}), dict(md.annotations or {}),
                   containers)


# Selection


def selected(sel: Selection, meta: PodMeta | None) -> tuple[bool, str]:
    """Whether to track a pod, and why not. Without metadata only "track all" can select."""
    if not sel.needs_metadata:
        return True, ""
    if meta is None:
        return False, "no-metadata"
    if sel.namespaces and meta.namespace not in sel.namespaces:
        return False, "namespace"
    if sel.label_selector and not matches(parse_selector(sel.label_selector), meta.labels):
        return False, "selector"
    if sel.annotation:
        key, eq, value = sel.annotation.partition("=")
        if key not in meta.annotations or (eq and meta.annotations[key] != value):
            return False, "annotation"
    return True, ""


Requirement = tuple[str, str, frozenset[str]]  # key, operator (= != in notin exists !), values

_TERM = re.compile(r"\s*(?:(!)\s*([\w./-]+)|([\w./-]+)\s*(?:(==|=|!=)\s*([\w./-]*)|"
                   r"\s(in|notin)\s*\(([^)]*)\))?)\s*(?:,|$)")


def parse_selector(text: str) -> list[Requirement]:
    """Kubernetes label selector syntax: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)."""
    reqs: list[Requirement] = []
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad label selector {text!r} at {text[pos:]!r}")
        neg, nkey, key, op, value, setop, values = m.groups()
        if neg:
            reqs.append((nkey, "!", frozenset()))
        elif op:
            reqs.append((key, "!=" if op == "!=" else "=", frozenset([value])))
        elif setop:
            reqs.append((key, setop, frozenset(v.strip() for v in values.split(",") if v.strip())))
        else:
            reqs.append((key, "exists", frozenset()))
        pos = m.end()
    return reqs


def matches(reqs: list[Requirement], labels: dict[str, str]) -> bool:
    for key, op, values in reqs:
        has, value = key in labels, labels.get(key)
        ok = {"=": has and value in values, "in": has and value in values,
              "!=": not has or value not in values, "notin": not has or value not in values,
              "exists": has, "!": not has}[op]
        if not ok:
            return False
    return True
