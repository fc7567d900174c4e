"""Credentials of a cluster: bearer tokens per identity, the service-account key, kubeconfigs.

Every client authenticates with a random token from the API server's token file: the admin
(system:masters), the controller manager and the scheduler (their built-in RBAC users), and each
kubelet as system:node:NAME (the Node authorizer's identity). The API server's own serving
certificate (self-signed, written into its --cert-dir) is the CA every kubeconfig trusts; the
controller manager puts it into service-account token secrets as ca.crt.
"""
from __future__ import annotations

import base64
import json
import secrets
import subprocess
from pathlib import Path

from memsnap.cluster import state

TOKENS = state.DATA_DIR / "tokens.csv"
SA_KEY = state.DATA_DIR / "sa.key"
CERT_DIR = state.DATA_DIR / "certs"
SERVING_CERT = CERT_DIR / "apiserver.crt"

# identity -> (user, groups)
ADMIN = ("admin", "system:masters")
CONTROLLER_MANAGER = ("system:kube-controller-manager", "")
SCHEDULER = ("system:kube-scheduler", "")


def kubelet_identity(node: str) -> tuple[str, str]:
    return (f"system:node:{node}", "system:nodes")


def server_url() -> str:
    return f"https://{state.API_ADDRESS}:{state.API_PORT}"


def make_credentials(nodes: list[str]) -> dict[str, str]:
    """Write the token file and the service-account key; returns user -> token."""
    state.DATA_DIR.mkdir(parents=True, exist_ok=True)
    identities = [ADMIN, CONTROLLER_MANAGER, SCHEDULER] + [kubelet_identity(n) for n in nodes]
    tokens = {user: secrets.token_hex(16) for user, _ in identities}
    lines = [f'{tokens[user]},{user},{user},"{groups}"' for user, groups in identities]
    _write_private(TOKENS, "\n".join(lines) + "\n")
    if not SA_KEY.exists():
        proc = subprocess.run(["openssl", "genrsa", "-out", str(SA_KEY), "2048"], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"openssl genrsa (service-account key) failed: {proc.stderr.strip()}")
    return tokens


def read_tokens() -> dict[str, str]:
    out = {}
    for line in TOKENS.read_text().splitlines():
        token, user = line.split(",")[:2]
        out[user] = token
    return out


def write(path: Path, user: str, token: str) -> Path:
    """A kubeconfig for user, trusting the API server's certificate (needs it written: API up)."""
    ca = base64.b64encode(SERVING_CERT.read_bytes()).decode()
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "memsnap",
        "clusters": [{"name": "memsnap", "cluster": {"server": server_url(), "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "memsnap", "context": {"cluster": "memsnap", "user": user}}],
    }
    _write_private(path, json.dumps(config, indent=2) + "\n")
    return path


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(text)
