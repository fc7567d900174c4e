"""The Kubernetes API, as plain dicts (the JSON the API server sends), for the domain layer.

Plain REST over aiohttp, like kopf's own clients: the operator's event loop never blocks, and the
requests do not depend on which generated `kubernetes` client is installed (its PATCH content
types changed between releases: Debian 13's 30.1 cannot send a merge patch to a custom resource's
status). The `kubernetes` package is used only to read a kubeconfig or the pod's service account.
"""
from __future__ import annotations

import datetime
import json
import socket
import ssl
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kubernetes
from kubernetes.client import Configuration

from ..constants import CHECKPOINTS, GROUP, MIGRATIONS, VERSION

COMPONENT = "memsnap-operator"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)


class KubeError(Exception):
    """The API server refused or did not answer."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def load_config(kubeconfig: str | None) -> Configuration:
    """A client configuration from a kubeconfig file, or in-cluster (service account) without one."""
    config = Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    else:
        kubernetes.config.load_incluster_config(client_configuration=config)
    return config


class Kube:
    """What the operator asks of the API server."""

    def __init__(self, config: Configuration):
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def bearer_token(self) -> str | None:
        """The service account's token (re-read when it rotates) or the kubeconfig's, if any."""
        header = self.config.get_api_key_with_prefix("BearerToken") or \
            self.config.get_api_key_with_prefix("authorization")
        return header.split(" ", 1)[-1] if header else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # ---- pods and nodes ------------------------------------------------------------------

    async def get_pod(self, namespace: str, name: str) -> dict | None:
        return await self._get(_pod(namespace, name))

    async def list_pods(self, namespace: str | None = None, field_selector: str = "") -> list[dict]:
        path = f"/api/v1/namespaces/{quote(namespace)}/pods" if namespace else "/api/v1/pods"
        return (await self._call("GET", path, query={"fieldSelector": field_selector}))["items"]

    async def create_pod(self, namespace: str, manifest: dict) -> dict:
        return await self._call("POST", f"/api/v1/namespaces/{quote(namespace)}/pods", manifest)

    async def patch_pod(self, namespace: str, name: str, patch: dict) -> dict:
        """A merge patch; with metadata.resourceVersion in it, a 409 if the pod changed since."""
        return await self._call("PATCH", _pod(namespace, name), patch, content_type=MERGE)

    async def set_pod_condition(self, namespace: str, name: str, condition: dict) -> dict:
        """Set one condition in a pod's status (a strategic merge keys conditions by type)."""
        return await self._call("PATCH", _pod(namespace, name) + "/status",
                                {"status": {"conditions": [condition]}}, content_type=STRATEGIC)

    async def delete_pod(self, namespace: str, name: str, *, uid: str | None = None,
                         grace_seconds: int | None = None) -> bool:
        """Delete a pod (only the one with `uid` if given); False when it was already gone."""
        body: dict[str, Any] = {}
        if uid:
            body["preconditions"] = {"uid": uid}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            await self._call("DELETE", _pod(namespace, name), body)
            return True
        except KubeError as exc:
            if exc.status in (404, 409):  # gone, or a different pod of that name now
                return False
            raise

    async def get_node(self, name: str) -> dict | None:
        return await self._get(f"/api/v1/nodes/{quote(name)}")

    async def list_nodes(self) -> list[dict]:
        return (await self._call("GET", "/api/v1/nodes"))["items"]

    async def get_pvc(self, namespace: str, name: str) -> dict | None:
        return await self._get(f"/api/v1/namespaces/{quote(namespace)}/persistentvolumeclaims/{quote(name)}")

    async def get_pv(self, name: str) -> dict | None:
        return await self._get(f"/api/v1/persistentvolumes/{quote(name)}")

    # ---- PodMigrations -------------------------------------------------------------------

    async def get_migration(self, namespace: str, name: str) -> dict | None:
        return await self._get(_custom(namespace, MIGRATIONS, name))

    async def patch_migration_status(self, namespace: str, name: str, status: dict) -> None:
        await self._patch_status(_custom(namespace, MIGRATIONS, name), status)

    # ---- PodCheckpoints ------------------------------------------------------------------

    async def get_checkpoint(self, namespace: str, name: str) -> dict | None:
        return await self._get(_custom(namespace, CHECKPOINTS, name))

    async def patch_checkpoint_status(self, namespace: str, name: str, status: dict) -> None:
        await self._patch_status(_custom(namespace, CHECKPOINTS, name), status)

    async def _patch_status(self, path: str, status: dict) -> None:
        """A merge patch of a resource's status; nothing when it is gone (deleted and its
        finalizer released: nothing to record on)."""
        try:
            await self._call("PATCH", path + "/status", {"status": status}, content_type=MERGE)
        except KubeError as exc:
            if exc.status != 404:
                raise

    # ---- events --------------------------------------------------------------------------

    async def events_of(self, namespace: str, uid: str) -> list[dict]:
        return (await self._call("GET", f"/api/v1/namespaces/{quote(namespace)}/events",
                                 query={"fieldSelector": f"involvedObject.uid={uid}"}))["items"]

    async def post_event(self, ref: dict, type_: str, reason: str, message: str) -> None:
        """An Event about ref ({apiVersion, kind, name, namespace, uid}), as kubectl describe shows."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {"apiVersion": "v1", "kind": "Event",
                 "metadata": {"generateName": f"{ref['name']}.", "namespace": ref["namespace"]},
                 "involvedObject": ref, "type": type_, "reason": reason, "message": message[:1024],
                 "source": {"component": COMPONENT}, "reportingComponent": f"{GROUP}/operator",
                 "reportingInstance": socket.gethostname(), "firstTimestamp": now, "lastTimestamp": now,
                 "count": 1}
        await self._call("POST", f"/api/v1/namespaces/{quote(ref['namespace'])}/events", event)

    # ---- plumbing ------------------------------------------------------------------------

    async def _get(self, path: str) -> dict | None:
        try:
            return await self._call("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def _call(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
                    content_type: str = "application/json") -> dict:
        url = self.config.host.rstrip("/") + path
        if query := {k: v for k, v in (query or {}).items() if v}:
            url += "?" + urlencode(query)
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if token := self.bearer_token():
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body)
        try:
            async with self._client().request(method, url, data=data, headers=headers) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # no connection, or no answer
            raise KubeError(f"{method} {path}: the API server did not answer: {exc!r}") from None
        if resp.status >= 400:
            raise KubeError(f"{method} {path}: {resp.status} {_reason(text)}", resp.status)
        return json.loads(text or "{}")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._tls()),
                                                  timeout=TIMEOUT)
        return self._session

    def _tls(self) -> ssl.SSLContext | bool:
        c = self.config
        if not c.host.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=c.ssl_ca_cert)
        if not c.verify_ssl:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if c.cert_file:
            context.load_cert_chain(c.cert_file, c.key_file)
        return context


def _pod(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}"


def _custom(namespace: str, plural: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{plural}/{quote(name)}"


def _reason(body: str) -> str:
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return str(body or "").strip()[:300]
