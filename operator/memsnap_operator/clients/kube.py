"""The Kubernetes API, as plain dicts (the JSON the API server sends), for the domain layer.

The official client is synchronous; every call runs in a worker thread so the operator's event
loop (kopf's) never blocks on the network.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import socket
from typing import Any

import kubernetes
import urllib3
from kubernetes.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi
from kubernetes.client.rest import ApiException

from ..constants import GROUP, MIGRATIONS, VERSION

COMPONENT = "memsnap-operator"


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
        self._api = ApiClient(config)
        self._core, self._custom = CoreV1Api(self._api), CustomObjectsApi(self._api)

    def bearer_token(self) -> str | None:
        header = self.config.get_api_key_with_prefix("BearerToken") or \
            self.config.get_api_key_with_prefix("authorization")
        return header.split(" ", 1)[-1] if header else None

    def close(self) -> None:
        self._api.close()

    # ---- pods and nodes ------------------------------------------------------------------

    async def get_pod(self, namespace: str, name: str) -> dict | None:
        return await self._get(self._core.read_namespaced_pod, name, namespace)

    async def list_pods(self, namespace: str | None = None, field_selector: str = "") -> list[dict]:
        if namespace:
            return (await self._call(self._core.list_namespaced_pod, namespace,
                                     field_selector=field_selector))["items"]
        return (await self._call(self._core.list_pod_for_all_namespaces, field_selector=field_selector))["items"]

    async def create_pod(self, namespace: str, manifest: dict) -> dict:
        return await self._call(self._core.create_namespaced_pod, namespace, manifest)

    async def patch_pod(self, namespace: str, name: str, patch: dict) -> dict:
        """A merge patch; with metadata.resourceVersion in it, a 409 if the pod changed since."""
        return await self._call(self._core.patch_namespaced_pod, name, namespace, patch,
                                _content_type="application/merge-patch+json")

    async def delete_pod(self, namespace: str, name: str, *, uid: str | None = None,
                         grace_seconds: int | None = None) -> bool:
        """Delete a pod (only the one with `uid` if given); False when it was already gone."""
        body: dict[str, Any] = {}
        if uid:
            body["preconditions"] = {"uid": uid}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            await self._call(self._core.delete_namespaced_pod, name, namespace, body=body)
            return True
        except KubeError as exc:
            if exc.status in (404, 409):  # gone, or a different pod of that name now
                return False
            raise

    async def get_node(self, name: str) -> dict | None:
        return await self._get(self._core.read_node, name)

    async def list_nodes(self) -> list[dict]:
        return (await self._call(self._core.list_node))["items"]

    async def get_pvc(self, namespace: str, name: str) -> dict | None:
        return await self._get(self._core.read_namespaced_persistent_volume_claim, name, namespace)

    async def get_pv(self, name: str) -> dict | None:
        return await self._get(self._core.read_persistent_volume, name)

    # ---- PodMigrations -------------------------------------------------------------------

    async def get_migration(self, namespace: str, name: str) -> dict | None:
        return await self._get(self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace,
                               MIGRATIONS, name)

    async def patch_migration_status(self, namespace: str, name: str, status: dict) -> None:
        try:
            await self._call(self._custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
                             MIGRATIONS, name, {"status": status},
                             _content_type="application/merge-patch+json")
        except KubeError as exc:
            if exc.status != 404:  # gone (deleted and its finalizer released): nothing to record on
                raise

    # ---- events --------------------------------------------------------------------------

    async def events_of(self, namespace: str, uid: str) -> list[dict]:
        return (await self._call(self._core.list_namespaced_event, namespace,
                                 field_selector=f"involvedObject.uid={uid}"))["items"]

    async def post_event(self, ref: dict, type_: str, reason: str, message: str) -> None:
        """An Event about ref ({apiVersion, kind, name, namespace, uid}), as kubectl describe shows."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {"apiVersion": "v1", "kind": "Event",
                 "metadata": {"generateName": f"{ref['name']}.", "namespace": ref["namespace"]},
                 "involvedObject": ref, "type": type_, "reason": reason, "message": message[:1024],
                 "source": {"component": COMPONENT}, "reportingComponent": f"{GROUP}/operator",
                 "reportingInstance": socket.gethostname(), "firstTimestamp": now, "lastTimestamp": now,
                 "count": 1}
        await self._call(self._core.create_namespaced_event, ref["namespace"], event)

    # ---- plumbing ------------------------------------------------------------------------

    async def _get(self, method, *args) -> dict | None:
        try:
            return await self._call(method, *args)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def _call(self, method, *args, **kwargs) -> dict:
        def call() -> dict:
            try:
                resp = method(*args, _preload_content=False, **kwargs)
            except ApiException as exc:
                raise KubeError(f"{method.__name__}: {exc.status} {_reason(exc.body)}", exc.status) from None
            except (OSError, urllib3.exceptions.HTTPError) as exc:  # no connection
                raise KubeError(f"{method.__name__}: the API server did not answer: {exc}") from None
            return json.loads(resp.data or b"{}")
        return await asyncio.to_thread(call)


def _reason(body: Any) -> str:
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return str(body or "").strip()[:300]
