"""The few API calls `memsnap cluster` makes itself (readiness, status), as the admin, over TLS."""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

from memsnap.cluster import kubeconfig


class ApiError(RuntimeError):
    """The API server did not answer (or refused)."""


def get(path: str, timeout: float = 5.0) -> dict:
    token = kubeconfig.read_tokens()[kubeconfig.ADMIN[0]]
    ctx = ssl.create_default_context(cafile=str(kubeconfig.SERVING_CERT))
    req = urllib.request.Request(kubeconfig.server_url() + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise ApiError(f"GET {path}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ApiError(f"the API server at {kubeconfig.server_url()} does not answer: {exc}") from None


def node_conditions() -> dict[str, dict]:
    """node name -> its Ready condition (status, reason, message) as the API server sees it."""
    out = {}
    for item in get("/api/v1/nodes").get("items", []):
        ready = next((c for c in item["status"].get("conditions", []) if c["type"] == "Ready"), {})
        out[item["metadata"]["name"]] = ready
    return out
