"""Pod names and selection from the Kubernetes API.

No cluster runs here, so a small HTTP server stands in for the API server: it answers the one
request the agent makes (list pods on this node) with a PodList as the API server words it.
The agent, its kubeconfig handling and the Kubernetes client library are the real ones."""
from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from .conftest import wait_for

pytestmark = pytest.mark.slow

NODE = "node-under-test"


def pod_json(cg, namespace: str, name: str, labels: dict, annotations: dict, container: str) -> dict:
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": cg.pod_uid,
                     "labels": labels, "annotations": annotations},
        "spec": {"nodeName": NODE, "containers": [{"name": container, "image": "example/app:1"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": container, "containerID": f"containerd://{cg.container_id}", "image": "example/app:1",
            "imageID": "sha256:" + "0" * 64, "ready": True, "restartCount": 0}]},
    }


class ApiServer:
    """Serves GET /api/v1/pods from `self.pods`; records each request's query."""

    def __init__(self):
        self.pods: list[dict] = []
        self.queries: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                outer.queries.append(urllib.parse.parse_qs(url.query))
                if url.path != "/api/v1/pods":
                    self.send_error(404)
                    return
                body = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                                   "items": outer.pods}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path) -> str:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
        return str(path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api_server():
    s = ApiServer()
    yield s
    s.close()


def start_agent(agent, api_server, tmp_path, *flags):
    return agent(*flags, interval=1.0, kubeconfig=api_server.kubeconfig(tmp_path / "kubeconfig"))


def test_names_come_from_the_api_and_selection_applies(agent, api_server, cgroups, workload, tmp_path):
    cart, web, other, unlisted = (cgroups.pod("v1-cgroupfs-containerd") for _ in range(4))
    for cg in (cart, web, other, unlisted):
        cgroups.place(workload(mib=1).pid, cg)
    api_server.pods = [
        pod_json(cart, "shop", "cart-0", {"app": "cart", "tier": "backend"}, {"memsnap.io/track": "true"}, "cart"),
        pod_json(web, "shop", "web-0", {"app": "web", "tier": "frontend"}, {"memsnap.io/track": "true"}, "nginx"),
        pod_json(other, "billing", "ledger-0", {"app": "cart"}, {"memsnap.io/track": "true"}, "ledger"),
    ]
    a = start_agent(agent, api_server, tmp_path, "--node-name", NODE, "--namespace", "shop",
                    "--selector", "app in (cart, web), tier!=frontend", "--annotation", "memsnap.io/track=true")

    def cart_rate():
        m = a.metrics()
        return m.get(("memsnap_dirty_bytes_per_second",
                      (("container", "cart"), ("namespace", "shop"), ("pod", "cart-0"))))
    wait_for(lambda: cart_rate() is not None, what="cart-0 exported under its names")
    assert api_server.queries and all(q.get("fieldSelector") == [f"spec.nodeName={NODE}"]
                                      for q in api_server.queries)
    pods = {p["uid"]: p for p in a.api()["pods"]}
    assert (pods[cart.pod_uid]["namespace"], pods[cart.pod_uid]["name"]) == ("shop", "cart-0")
    assert pods[cart.pod_uid]["containers"][0]["name"] == "cart"
    assert a.api("/api/v1/pods/shop/cart-0")["uid"] == cart.pod_uid
    assert a.api(f"/api/v1/pods/{cart.pod_uid}")["name"] == "cart-0"
    assert a.get("/api/v1/pods/shop/nothing-here")[0] == 404

    def reasons(cg):
        return [(p.get("skipped", ""), p.get("detail", "")) for c in pods[cg.pod_uid]["containers"]
                for p in c["processes"]]
    assert reasons(cart) == [("", "")]
    assert reasons(web) == [("not-selected", "selector")]
    assert reasons(other) == [("not-selected", "namespace")]
    assert reasons(unlisted) == [("no-metadata", "no-metadata")]
    m = a.metrics()
    assert m[("memsnap_skipped_processes", (("reason", "not-selected"),))] == 2
    assert m[("memsnap_agent_info", (("kube_api", "ok"), ("node", NODE), ("version", "0.1.0")))] == 1

    # A pod the API lists later is picked up and named within an interval or two.
    api_server.pods.append(pod_json(unlisted, "shop", "late-0", {"app": "cart"}, {"memsnap.io/track": "true"}, "late"))
    wait_for(lambda: (p := a.pod(unlisted.pod_uid)) and p["name"] == "late-0"
             and not p["containers"][0]["processes"][0].get("skipped"), timeout=10, what="late-0 tracked")


def test_an_unreachable_api_leaves_tracking_by_uid(agent, api_server, cgroups, workload, tmp_path):
    cg = cgroups.pod("v2-cgroupfs-crio")
    cgroups.place(workload(mib=1).pid, cg)
    api_server.close()  # the kubeconfig points at a closed port
    a = start_agent(agent, api_server, tmp_path, "--node-name", NODE)
    labels = (("container", cg.container_id), ("namespace", ""), ("pod", cg.pod_uid))
    wait_for(lambda: a.metrics().get(("memsnap_dirty_bytes_per_second", labels)) is not None,
             what="the pod tracked by UID")
    assert a.metrics()[("memsnap_agent_info", (("kube_api", "error"), ("node", NODE), ("version", "0.1.0")))] == 1
