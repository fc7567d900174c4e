"""charts/memsnap as a user reads it before installing: lint, and what `helm template` renders
(the kinds, who runs privileged and with which host paths, what RBAC grants, where the CA key
goes, monitoring only where the Prometheus operator is). No cluster needed."""
from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
import yaml

from memsnap import pki
from memsnap.cluster import chart

CHART = chart.CHART_DIR
REPO = CHART.parents[1]
MONITORING_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([chart.helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def render(*args: str, api_versions: tuple[str, ...] = ()) -> list[dict]:
    extra = [a for v in api_versions for a in ("--api-versions", v)]
    out = helm("template", "memsnap", str(CHART), "--namespace", "memsnap-system", *extra, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict], kind: str, suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def test_lint_strict_passes():
    proc = helm("lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_defaults_render_every_part():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in render())
    assert kinds == sorted([
        ("ClusterRole", "memsnap-agent"), ("ClusterRole", "memsnap-operator"),
        ("ClusterRoleBinding", "memsnap-agent"), ("ClusterRoleBinding", "memsnap-operator"),
        ("ConfigMap", "memsnap-dashboard"), ("DaemonSet", "memsnap-agent"), ("Deployment", "memsnap-operator"),
        ("NetworkPolicy", "memsnap-agent"), ("RuntimeClass", "memsnap"), ("Secret", "memsnap-ca"),
        ("Service", "memsnap-agent"), ("ServiceAccount", "memsnap-agent"), ("ServiceAccount", "memsnap-operator")])


def test_agent_is_privileged_on_the_hosts_pids_and_network_with_only_its_host_paths():
    ds = one(render(), "DaemonSet", "-agent")["spec"]["template"]["spec"]
    assert ds["hostPID"] and ds["hostNetwork"]
    agent = ds["containers"][0]
    assert agent["securityContext"]["privileged"] is True
    assert agent["args"][0] == "agent" and "--listen=$(NODE_IP):9650" in agent["args"]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in agent["env"]}
    assert env["NODE_NAME"] == "spec.nodeName" and env["NODE_IP"] == "status.hostIP"
    host_paths = sorted(v["hostPath"]["path"] for v in ds["volumes"] if "hostPath" in v)
    assert host_paths == ["/run/containerd", "/run/memsnap", "/sys/fs/cgroup", "/var/lib/memsnap"]
    assert ds["tolerations"] == [{"operator": "Exists"}] and "nodeSelector" not in ds


def test_the_ca_key_is_mounted_into_init_containers_only():
    for kind, suffix in (("DaemonSet", "-agent"), ("Deployment", "-operator")):
        spec = one(render(), kind, suffix)["spec"]["template"]["spec"]
        ca_volumes = {v["name"] for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "memsnap-ca"}
        assert ca_volumes == {"ca"}
        assert [c["name"] for c in spec["initContainers"]
                if any(m["name"] == "ca" for m in c["volumeMounts"])] == ["identity"]
        assert not [c["name"] for c in spec["containers"] if any(m["name"] == "ca" for m in c["volumeMounts"])]


def test_operator_runs_unprivileged_and_read_only():
    spec = one(render(), "Deployment", "-operator")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    op = spec["containers"][0]
    assert op["args"][0] == "operator"
    assert op["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                     "capabilities": {"drop": ["ALL"]}}
    assert "hostPID" not in spec and "hostNetwork" not in spec


def rules(docs: list[dict], suffix: str) -> list[dict]:
    return one(docs, "ClusterRole", suffix)["rules"]


def test_rbac_grants_least_privilege():
    docs = render()
    assert rules(docs, "-agent") == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    op = rules(docs, "-operator")
    granted = {(g, r): set(rule["verbs"]) for rule in op for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted[("", "pods")] == {"create", "delete", "get", "list", "watch", "patch"}
    assert granted[("", "nodes")] == {"get", "list"}
    assert granted[("memsnap.io", "podmigrations/status")] >= {"patch"}
    for rule in rules(docs, "-agent") + op:  # no wildcards, no secrets, nothing on RBAC itself
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert "secrets" not in rule["resources"]
        assert "rbac.authorization.k8s.io" not in rule["apiGroups"]


def test_monitoring_only_where_the_prometheus_operator_is():
    assert not [d for d in render() if d["kind"] in ("ServiceMonitor", "PrometheusRule")]
    docs = render(api_versions=MONITORING_APIS)
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert one(docs, "PrometheusRule")["spec"] == yaml.safe_load((REPO / "monitoring/rules.yml").read_text())
    off = render("--set", "monitoring.serviceMonitor.enabled=false", "--set", "monitoring.prometheusRule.enabled=false",
                 api_versions=MONITORING_APIS)
    assert not [d for d in off if d["kind"] in ("ServiceMonitor", "PrometheusRule")]


def test_dashboard_configmap_for_grafanas_sidecar():
    cm = one(render(), "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["memsnap.json"] == (REPO / "monitoring/grafana-dashboard.json").read_text().rstrip("\n")


def test_values_narrow_nodes_and_bring_an_existing_ca():
    docs = render("--set-string", "agent.nodeSelector.memsnap\\.io/agent=true", "--set", "tls.existingSecret=my-ca")
    ds = one(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    assert ds["nodeSelector"] == {"memsnap.io/agent": "true"}
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert {v["secret"]["secretName"] for v in ds["volumes"] if "secret" in v} == {"my-ca"}


def test_cert_manager_makes_the_ca_where_it_is_asked_for_and_present():
    asked = ("--set", "tls.certManager.enabled=true")
    assert one(render(*asked), "Secret", "-ca")  # no cert-manager API: the chart's own CA
    docs = render(*asked, api_versions=("cert-manager.io/v1/Certificate",))
    assert not [d for d in docs if d["kind"] == "Secret"]
    cert = one(docs, "Certificate")
    assert cert["spec"]["isCA"] and cert["spec"]["secretName"] == "memsnap-ca"
    assert one(docs, "Issuer")["spec"] == {"selfSigned": {}}
    init = one(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]["initContainers"][0]
    assert "set -- tls.crt tls.key" in init["args"][0]  # cert-manager's key names


def test_the_generated_ca_issues_memsnap_certificates(tmp_path: Path, monkeypatch):
    """helm's genCA makes the CA; memsnap's own pki (as the init containers run it) issues from it,
    and an agent's context and a client's context built on those files talk to each other."""
    secret = one(render(), "Secret", "-ca")
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir(mode=0o700)
    for name in ("ca.crt", "ca.key"):
        (ca_dir / name).write_bytes(base64.b64decode(secret["data"][name]))
    ca = pki.CA.load(ca_dir)
    node, client = ca.issue_node("node-1", "198.18.0.11"), ca.issue_client("operator")
    node_files = pki.TlsFiles(tmp_path / "n.crt", tmp_path / "n.key", ca_dir / "ca.crt")
    client_files = pki.TlsFiles(tmp_path / "c.crt", tmp_path / "c.key", ca_dir / "ca.crt")
    pki.write_credentials(node, node_files)
    pki.write_credentials(client, client_files)
    assert ca.signed(node.cert) and ca.signed(client.cert)
    assert pki.identity_of(client.cert) == pki.Peer("operator", "client")
    pki.server_context(node_files)
    pki.client_context(client_files)


def test_an_api_server_address_for_clusters_without_kube_proxy():
    docs = render("--set", "apiServer.host=198.18.0.1", "--set-string", "apiServer.port=6443")
    for kind, suffix in (("DaemonSet", "-agent"), ("Deployment", "-operator")):
        container = one(docs, kind, suffix)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("198.18.0.1", "6443")
    default = one(render(), "DaemonSet", "-agent")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "KUBERNETES_SERVICE_HOST" not in {e["name"] for e in default}  # the in-cluster default


def test_a_bad_value_is_refused_with_its_name():
    proc = helm("template", "memsnap", str(CHART), "--set", "agent.port=not-a-port", check=False)
    assert proc.returncode != 0 and "port" in proc.stderr
