"""memsnap as `memsnap cluster up` installs it by its chart, on the real cluster: the release, the
agents on every node answering mutual TLS on the node's address, the manifests against the real API
server (server-side dry run), least privilege as the API server answers it, upgrade, uninstall."""
from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from memsnap import nodes, pki
from memsnap.agent.client import AgentClient, AgentError
from memsnap.cluster import chart
from memsnap.cluster.testing import BARE_ENV, bare_cluster, local_only, pod, run_cli
from memsnap.nodes import agents

pytestmark = [pytest.mark.cluster, pytest.mark.slow, local_only,
              pytest.mark.skipif(bare_cluster(), reason=f"{BARE_ENV} is set: the cluster has no chart")]
NS = chart.NAMESPACE
AGENT_SA = f"system:serviceaccount:{NS}:{chart.RELEASE}-agent"
OPERATOR_SA = f"system:serviceaccount:{NS}:{chart.RELEASE}-operator"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([chart.helm_binary(), "--kubeconfig", str(chart.state.ADMIN_KUBECONFIG), *args],
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args[:2])}: {proc.stderr}"
    return proc


def status_of(node: str) -> dict:
    async def get() -> dict:
        async with agents.client(node) as agent:
            return await agent.get_json("/api/v1/status")
    return asyncio.run(get())


def test_up_gives_a_deployed_release(cluster):
    releases = json.loads(helm("list", "-A", "-o", "json").stdout)
    mine = [r for r in releases if r["name"] == chart.RELEASE]
    assert len(mine) == 1 and mine[0]["namespace"] == NS and mine[0]["status"] == "deployed"
    status = json.loads(run_cli("status", "--json").stdout)
    assert status["memsnap"].startswith(f"agents Ready on {len(cluster.nodes)} of {len(cluster.nodes)} nodes")


def test_an_agent_is_ready_on_every_node(cluster, kubectl):
    pods = kubectl.json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=agent")["items"]
    ready = {p["spec"]["nodeName"]: all(c["ready"] for c in p["status"]["containerStatuses"]) for p in pods}
    assert ready == {n: True for n in cluster.nodes}


def test_agents_answer_mutual_tls_on_the_node_address_and_name_pods_from_the_api(cluster, kubectl):
    kubectl.apply(pod("chart-named", "node-1", ["sleep", "3600"]))
    kubectl.pod_running("chart-named")
    try:
        for node in cluster.nodes:  # the client checks that the certificate names the node
            status = status_of(node)
            assert status["node"] == node and status["kube_api"] == "ok", status

        async def named() -> dict | None:
            async with agents.client("node-1") as agent:
                try:
                    found = await agent.get_json("/api/v1/pods/default/chart-named")
                except AgentError as exc:
                    if exc.status == 404:
                        return None
                    raise
                # the sandbox shows first, by ID; the app container by its name once tracked
                return found if "main" in [c["name"] for c in found["containers"]] else None
        found = kubectl.wait_for(lambda: asyncio.run(named()), "node-1's agent to name the pod", timeout=60)
        assert found["namespace"] == "default" and found["name"] == "chart-named"
    finally:
        kubectl("delete", "pod", "chart-named", "--grace-period=0", "--force", check=False)


def test_metrics_are_plain_on_the_next_port(cluster):
    for node in cluster.nodes:
        address = nodes.get(node).address
        with urllib.request.urlopen(f"http://{address}:9651/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert f'node="{node}"' in body and "memsnap_agent_info" in body


def test_a_pod_reaches_the_api_server_through_the_kubernetes_service(cluster, kubectl):
    """No kube-proxy: the nodes DNAT the `kubernetes` Service, so an in-cluster client on the pod
    network (as the operator is) works with its in-cluster configuration unchanged."""
    image = kubectl.json("get", "daemonset", f"{chart.RELEASE}-agent", "-n", NS)["spec"]["template"]["spec"][
        "containers"][0]["image"]
    script = ("from kubernetes import client, config; config.load_incluster_config(); "
              "print(client.Configuration.get_default_copy().host, client.VersionApi().get_code().git_version)")
    manifest = pod("chart-incluster", "node-2", ["python3", "-c", script], image=image, restartPolicy="Never")
    kubectl.apply(manifest)
    try:
        done = kubectl.wait_for(lambda: kubectl.json("get", "pod", "chart-incluster")["status"].get("phase")
                                in ("Succeeded", "Failed") or None, "the in-cluster client to finish", timeout=90)
        assert done
        logs = kubectl("logs", "chart-incluster").stdout.split()
        assert kubectl.json("get", "pod", "chart-incluster")["status"]["phase"] == "Succeeded", logs
        assert logs[-1] == "v1.20.2" and logs[-2].startswith("https://198.18.128.1")
    finally:
        kubectl("delete", "pod", "chart-incluster", "--grace-period=0", "--force", check=False)


def test_a_certificate_from_another_ca_is_refused(cluster, tmp_path: Path):
    other = pki.CA.new("not memsnap")
    files = pki.TlsFiles(tmp_path / "c.crt", tmp_path / "c.key", pki.PKI_DIR / "ca.crt")
    pki.write_credentials(other.issue_client("operator"), files)

    async def call() -> None:
        async with AgentClient("node-1", files=files, address=nodes.get("node-1").address, timeout=10) as agent:
            await agent.get_json("/api/v1/status")
    with pytest.raises(AgentError) as err:
        asyncio.run(call())
    assert err.value.status is None  # refused in the handshake, no HTTP answer


def test_the_rendered_manifests_pass_a_server_side_dry_run(cluster, kubectl):
    rendered = helm("template", "dryrun", str(chart.CHART_DIR), "--namespace", NS).stdout
    proc = kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert proc.returncode == 0, proc.stderr
    kinds = {line.split("/")[0] for line in proc.stdout.splitlines()}
    assert {"daemonset.apps", "deployment.apps", "clusterrole.rbac.authorization.k8s.io",
            "runtimeclass.node.k8s.io"} <= kinds, proc.stdout


def can(kubectl, who: str, verb: str, resource: str, namespace: str = "default", subresource: str = "") -> bool:
    """What `kubectl auth can-i VERB RESOURCE --as=WHO` asks, as a SubjectAccessReview naming the
    group exactly (kubectl would read "podmigrations.memsnap.io" as version memsnap of group io
    while the CRD is not installed) and with the groups a service account's token carries."""
    name, _, group = resource.partition(".")
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": who, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NS}",
                                               "system:authenticated"],
                       "resourceAttributes": {"verb": verb, "group": group, "resource": name,
                                              "subresource": subresource, "namespace": namespace}}}
    out = kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review))
    return json.loads(out.stdout)["status"].get("allowed", False)


def test_the_agent_may_read_pods_and_nothing_else(cluster, kubectl):
    allowed = {(v, "pods"): True for v in ("get", "list", "watch")}
    denied = {("create", "pods"): False, ("delete", "pods"): False, ("patch", "pods"): False,
              ("get", "secrets"): False, ("list", "secrets"): False, ("list", "nodes"): False,
              ("list", "podmigrations.memsnap.io"): False}
    asked = {key: can(kubectl, AGENT_SA, *key) for key in {**allowed, **denied}}
    assert asked == {**allowed, **denied}
    assert not can(kubectl, AGENT_SA, "create", "pods", subresource="exec")
    assert can(kubectl, "system:serviceaccount:default:default", "list", "pods") is False  # the check can say no
    assert not can(kubectl, AGENT_SA, "get", "secrets", namespace=NS)  # not even the CA beside it


def test_the_operator_may_do_its_work_and_no_more(cluster, kubectl):
    allowed = {("create", "pods"): True, ("delete", "pods"): True, ("patch", "pods"): True,
               ("watch", "pods"): True, ("list", "nodes"): True, ("create", "events"): True,
               ("list", "podmigrations.memsnap.io"): True, ("patch", "podcheckpoints.memsnap.io"): True,
               ("get", "persistentvolumeclaims"): True}
    denied = {("get", "secrets"): False, ("list", "secrets"): False, ("patch", "nodes"): False,
              ("delete", "nodes"): False, ("create", "deployments.apps"): False,
              ("create", "clusterrolebindings.rbac.authorization.k8s.io"): False}
    asked = {key: can(kubectl, OPERATOR_SA, *key) for key in {**allowed, **denied}}
    assert asked == {**allowed, **denied}
    assert can(kubectl, OPERATOR_SA, "patch", "podmigrations.memsnap.io", subresource="status")
    assert can(kubectl, OPERATOR_SA, "patch", "pods", subresource="status")
    assert not can(kubectl, OPERATOR_SA, "update", "pods", subresource="status")
    assert not can(kubectl, OPERATOR_SA, "create", "pods", subresource="exec")
    assert not can(kubectl, OPERATOR_SA, "get", "secrets", namespace=NS)


def test_an_upgrade_rolls_the_agents_with_the_new_values(cluster):
    before = json.loads(helm("history", chart.RELEASE, "-n", NS, "-o", "json").stdout)[-1]["revision"]
    try:
        helm("upgrade", chart.RELEASE, str(chart.CHART_DIR), "-n", NS, "--reuse-values", "--set", "agent.interval=5")
        chart.wait_ready(len(cluster.nodes), operator=False)
        assert {n: status_of(n)["interval_seconds"] for n in cluster.nodes} == {n: 5.0 for n in cluster.nodes}
        history = json.loads(helm("history", chart.RELEASE, "-n", NS, "-o", "json").stdout)
        assert history[-1]["revision"] == before + 1 and history[-1]["status"] == "deployed"
    finally:
        helm("upgrade", chart.RELEASE, str(chart.CHART_DIR), "-n", NS, "--reuse-values", "--set", "agent.interval=10")
        chart.wait_ready(len(cluster.nodes), operator=False)


def test_cluster_install_upgrades_the_running_release(cluster):
    """`memsnap cluster install`: what a developer runs after changing the code."""
    before = json.loads(helm("history", chart.RELEASE, "-n", NS, "-o", "json").stdout)[-1]["revision"]
    proc = run_cli("install", timeout=600)
    assert proc.returncode == 0, proc.stderr
    history = json.loads(helm("history", chart.RELEASE, "-n", NS, "-o", "json").stdout)
    assert history[-1]["revision"] == before + 1 and history[-1]["status"] == "deployed"
    assert all(status_of(n)["node"] == n for n in cluster.nodes)


@pytest.mark.skipif(not chart.operator_available(), reason="this checkout has no `memsnap operator` yet")
def test_the_charts_operator_runs_in_its_pod(cluster, kubectl):
    """The session's cluster runs no operator (tests/operator start their own): scaled up, the
    chart's runs as it would after a plain `cluster up`: non-root, read-only, in-cluster config,
    its client certificate from the init container; its metrics answer on the pod's address."""
    deployment = f"{chart.RELEASE}-operator"
    kubectl("scale", "deployment", deployment, "-n", NS, "--replicas=1")
    try:
        def available() -> dict | None:
            pods = kubectl.json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=operator")["items"]
            ready = [p for p in pods if p["status"].get("containerStatuses")
                     and all(c["ready"] for c in p["status"]["containerStatuses"])]
            return ready[0] if ready else None
        op = kubectl.wait_for(available, "the chart's operator to be ready", timeout=120)  # probe: /metrics
        with urllib.request.urlopen(f"http://{op['status']['podIP']}:9660/metrics", timeout=10) as resp:
            assert resp.status == 200
        time.sleep(5)  # its watches start after /metrics: give a refusal time to show in the log
        log = kubectl("logs", "-n", NS, op["metadata"]["name"]).stdout
        assert "Activity 'login' succeeded" in log and "Forbidden" not in log and "403" not in log, log[-3000:]
    finally:
        kubectl("scale", "deployment", deployment, "-n", NS, "--replicas=0")
        kubectl.wait_for(lambda: not kubectl.json("get", "pods", "-n", NS, "-l",
                                                  "app.kubernetes.io/component=operator")["items"] or None,
                         "the operator's pod to go", timeout=90)


def test_the_chart_made_ca_is_kept_across_upgrades(cluster, kubectl):
    """Without tls.existingSecret the chart makes its CA once (lookup): an upgrade keeps it."""
    ns, release = "memsnap-ca-check", "ca-check"
    only_ca = ["--set", "agent.enabled=false", "--set", "operator.enabled=false", "--set", "runtimeClass.create=false",
               "--set", "monitoring.grafanaDashboard.enabled=false"]
    try:
        helm("install", release, str(chart.CHART_DIR), "-n", ns, "--create-namespace", *only_ca)
        first = kubectl.json("get", "secret", f"{release}-memsnap-ca", "-n", ns)["data"]
        helm("upgrade", release, str(chart.CHART_DIR), "-n", ns, *only_ca, "--set", "tls.caDays=30")
        second = kubectl.json("get", "secret", f"{release}-memsnap-ca", "-n", ns)["data"]
        assert second == first and set(first) == {"ca.crt", "ca.key"}
    finally:
        helm("uninstall", release, "-n", ns, check=False)
        kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.cluster(destructive=True)
def test_uninstall_leaves_nothing_cluster_scoped_but_the_crds(cluster, kubectl):
    crds = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted((chart.CHART_DIR / "crds").glob("*.yaml"))]
    selector = f"app.kubernetes.io/instance={chart.RELEASE}"
    assert kubectl.json("get", "clusterroles", "-l", selector)["items"]
    try:
        helm("uninstall", chart.RELEASE, "-n", NS, "--wait")
        for kind in ("clusterroles", "clusterrolebindings", "runtimeclasses"):
            assert kubectl.json("get", kind, "-l", selector)["items"] == [], kind
        assert chart.RELEASE not in [r["name"] for r in json.loads(helm("list", "-A", "-o", "json").stdout)]
        left = kubectl.wait_for(lambda: not kubectl.json("get", "pods", "-n", NS)["items"] or None,
                                "the release's pods to go", timeout=90)
        assert left
        for name in crds:
            kubectl("get", "crd", name)
    finally:  # the cluster as the other tests expect it: memsnap installed
        chart.install([chart.worker.Worker(n.name, n.index, n.address) for n in map(nodes.get, cluster.nodes)],
                      log=lambda msg: None, operator=False)
