"""The alerting rules and the dashboard: promtool's unit tests, and a real Prometheus scraping a
real agent until the convergence alert fires for a real workload."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO

from .conftest import free_port, wait_for

MONITORING = REPO / "monitoring"
METRICS_DOC = REPO / "docs" / "metrics.md"
MIB = 1 << 20


def promtool(*args: str) -> subprocess.CompletedProcess:
    if not shutil.which("promtool"):
        pytest.skip("promtool not installed (Debian package prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=MONITORING, timeout=60)


def test_rules_are_valid_and_their_unit_tests_pass():
    checked = promtool("check", "rules", "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(memsnap_[a-z_]+)`", METRICS_DOC.read_text(), re.M))


def test_dashboard_and_rules_use_only_documented_metrics():
    documented = documented_metrics()
    assert "memsnap_dirty_bytes_per_second" in documented
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"memsnap_[a-z_]+", e)}
    assert used <= documented | {m + "_total" for m in documented}, used - documented


def test_every_exported_metric_is_documented(agent):
    a = agent()
    _, body = a.get("/metrics")
    exported = {m.removesuffix("_total") for m in re.findall(r"^# TYPE (memsnap_[a-z_]+) ", body, re.M)}
    documented = {m.removesuffix("_total") for m in documented_metrics()}
    assert exported and exported == documented, (exported - documented, documented - exported)


# A real Prometheus


class Prometheus:
    def __init__(self, tmp: Path, target: str, rules: Path):
        if not shutil.which("prometheus"):
            pytest.skip("prometheus not installed (Debian package prometheus)")
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "memsnap-agent", "static_configs": [{"targets": [target]}]}]}))
        self.log = open(tmp / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())["data"]

    def query(self, expr: str) -> list[dict]:
        try:
            return self.api("query", query=expr)["result"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr}: {exc.read().decode()}") from None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    started = []

    def start(target: str, rules: Path) -> Prometheus:
        p = Prometheus(tmp_path, target, rules)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def fast_rules(tmp: Path) -> Path:
    """The shipped rules with every `for:` cut to 3 s, so a test need not wait minutes."""
    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "3s"
    path = tmp / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


@pytest.mark.slow
def test_prometheus_scrapes_the_agent_until_the_convergence_alert_fires(
        tmp_path, agent, prometheus, cgroups, workload):
    # (Prometheus drops empty labels: without API, namespace="" is no label at all.)
    # A pod dirtying 4 MiB/s on a node whose agent says migrations get 1 MiB/s: cannot converge.
    busy, quiet = cgroups.pod("v1-cgroupfs-containerd"), cgroups.pod("v2-systemd-crio")
    w_busy, w_quiet = workload(mib=4), workload(mib=4)
    cgroups.place(w_busy.pid, busy)
    cgroups.place(w_quiet.pid, quiet)
    a = agent("--bandwidth", "1Mi", interval=1.0)
    w_busy.send("churn 40000 120")
    prom = prometheus(f"127.0.0.1:{a.port}", fast_rules(tmp_path))

    def firing():
        try:
            alerts = prom.api("alerts")["alerts"]
        except OSError:  # not listening yet
            return []
        return [al for al in alerts if al["labels"]["alertname"] == "MemsnapDirtyRateCannotConverge"
                and al["state"] == "firing"]
    alerts = wait_for(firing, timeout=60, every=1, what="MemsnapDirtyRateCannotConverge firing")
    assert [(al["labels"].get("namespace", ""), al["labels"]["pod"]) for al in alerts] == [("", busy.pod_uid)]

    # What Prometheus stored is the workload's ground truth: 4 MiB/s busy, next to nothing quiet.
    rate = {r["metric"]["pod"]: float(r["value"][1])
            for r in prom.query('max_over_time(memsnap_dirty_bytes_per_second[5s])')}
    assert 4 * MIB * 0.95 <= rate[busy.pod_uid] <= 4 * MIB * 1.25, rate
    assert rate[quiet.pod_uid] < 0.1 * MIB, rate
    assert prom.query('up{job="memsnap-agent"}')[0]["value"][1] == "1"

    # Every dashboard query runs against this real data (Grafana variables set to "All").
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    results = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r"\$(namespace|pod|instance)\b", ".*", target["expr"])
            results[(panel["title"], target["refId"])] = prom.query(expr)  # raises on a bad query
    for title in ("Dirty rate by pod", "Dirty rate vs migration bandwidth", "Writable working set (window)",
                  "Tracked memory", "Agent CPU vs cap", "Tracked processes by backend"):
        assert results[(title, "A")], title
    over = {r["metric"]["pod"]: float(r["value"][1]) for r in results[("Dirty rate vs migration bandwidth", "A")]}
    assert over[busy.pod_uid] >= 1 > over[quiet.pod_uid]
