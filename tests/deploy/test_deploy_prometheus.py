"""deploy/prometheus: promtool checks the configs and the rules and runs the rules' unit tests; a
real Prometheus server scrapes a real controller and agent and sees a compress; every alert
expression refers to metrics and labels the code exports."""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.certs import make_certs
from tests.deploy.mesh import (INSTANCE_ID, LOCATION, METHOD, NUM_CHUNKS, TOKEN, Mesh, Prometheus, http_json,
                               poll, rewrite_paths)
from tests.deploy.deploy_support import DEPLOY, tool
from tests.deploy.promql import Exported, problems

PROM = DEPLOY / "prometheus"
ALERTS = yaml.safe_load((PROM / "alerts.yml").read_text())
ALERT_RULES = [r for g in ALERTS["groups"] for r in g["rules"] if "alert" in r]


CONFIGS = ["prometheus.yml", "prometheus-kubernetes.yml"]


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per config, the files it names (where compose and Kubernetes mount them) -> real test files."""
    tmp = tmp_path_factory.mktemp("prometheus-secrets")
    certs = make_certs(tmp / "certs")
    (tmp / "token").write_text(TOKEN + "\n")
    return {
        "prometheus.yml": {"/run/secrets/kvmesh-token": tmp / "token", "/run/secrets/kvmesh-ca": certs / "ca.crt",
                           "/run/secrets/kvmesh-client-cert": certs / "client.crt",
                           "/run/secrets/kvmesh-client-key": certs / "client.key"},
        "prometheus-kubernetes.yml": {
            "/etc/prometheus/kvmesh/token": tmp / "token", "/etc/prometheus/kvmesh-tls/ca.crt": certs / "ca.crt",
            "/etc/prometheus/kvmesh-tls/tls.crt": certs / "client.crt",
            "/etc/prometheus/kvmesh-tls/tls.key": certs / "client.key"},
    }


def checkable_copy(name: str, files: dict[str, Path], folder: Path) -> Path:
    """``name`` with the files it names where they exist here (promtool checks them), beside its rules."""
    folder.mkdir(exist_ok=True)
    shutil.copy(PROM / "alerts.yml", folder / "alerts.yml")
    (folder / name).write_text(rewrite_paths((PROM / name).read_text(), files))
    return folder / name


@pytest.mark.parametrize("name", CONFIGS)
def test_every_scrape_job_sends_the_token(name: str, secret_files) -> None:
    config = yaml.safe_load((PROM / name).read_text())
    assert config["scrape_configs"]
    for job in config["scrape_configs"]:
        auth = job.get("authorization")
        assert auth and auth.get("type", "Bearer") == "Bearer", f"{name}: {job['job_name']} sends no token"
        # From a file (mounted from the secret), never inline in the config.
        assert set(auth) <= {"type", "credentials_file"} and auth["credentials_file"] in secret_files[name]
        tls = job.get("tls_config", {})
        for key in ("ca_file", "cert_file", "key_file"):
            assert tls.get(key) in (None, *secret_files[name]), f"{name}: {job['job_name']} {key}"
        if job.get("scheme") == "https" or "tls_config" in job:
            # Mutual TLS: the CA to check the server, a client certificate to show.
            assert {"ca_file", "cert_file", "key_file"} <= set(tls), f"{name}: {job['job_name']}"
    # The controller's job speaks HTTPS (static config) or follows the pods' scheme annotation.
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    if name == "prometheus.yml":
        assert jobs["kvmesh-controller"]["scheme"] == "https" and "scheme" not in jobs["kvmesh-agent"]
    else:
        (job,) = jobs.values()
        assert any(r.get("target_label") == "__scheme__" and r["source_labels"] == [
            "__meta_kubernetes_pod_annotation_prometheus_io_scheme"] for r in job["relabel_configs"])


def test_promtool_checks_the_scrape_config(secret_files, tmp_path: Path) -> None:
    # As written: the syntax (promtool checks the files too, which exist only where they are mounted).
    out = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode != 0 and "/run/secrets/kvmesh-token" in out.stdout + out.stderr, out.stdout + out.stderr
    # With every file it names present: the full check, files and rules included.
    copy = checkable_copy("prometheus.yml", secret_files["prometheus.yml"], tmp_path)
    out = promtool("check", "config", copy.name, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_checks_the_kubernetes_scrape_config(secret_files, tmp_path: Path) -> None:
    copy = checkable_copy("prometheus-kubernetes.yml", secret_files["prometheus-kubernetes.yml"], tmp_path)
    out = promtool("check", "config", copy.name, cwd=tmp_path)
    if out.returncode != 0 and "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's package); "
                    "upstream Prometheus builds check it")
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_scrape_config_relabels_to_the_alerts_job_names() -> None:
    config = yaml.safe_load((PROM / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    relabel = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
    assert relabel[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    assert relabel[("__meta_kubernetes_pod_annotation_kvmesh_io_job",)]["target_label"] == "job"
    # The address rewrite keeps the pod IP and takes the annotated port.
    rule = relabel[("__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port")]
    joined = "10.1.2.3:8000;9101"
    m = re.fullmatch(rule["regex"], joined)
    assert m and rule["replacement"].replace("$1", m.group(1)).replace("$2", m.group(2)) == "10.1.2.3:9101"


def test_promtool_checks_the_rules() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERT_RULES)} rules found" in out.stdout


def test_promtool_runs_the_rule_unit_tests() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for rule in ALERT_RULES:
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it stays quiet"
    assert {r["alert"] for r in ALERT_RULES} >= {"KVMeshAgentDown", "KVMeshEventsFailing",
                                                 "KVMeshCompressionRatioCollapsing", "KVMeshEventLatencyHigh"}


def test_alert_expressions_use_exported_metrics(mesh: Mesh) -> None:
    exported = Exported()
    exported.add_exposition(mesh.scrape(mesh.http_port))
    exported.add_exposition(mesh.scrape(mesh.agent_metrics_port))
    found = [p for rule in ALERT_RULES for p in problems(rule["expr"], exported)]
    assert not found, "\n".join(found)


def test_real_prometheus_sees_the_compress(mesh: Mesh, prometheus: Prometheus) -> None:
    logs: list[Path] = [mesh.tmp / "prometheus" / "prometheus.log"]
    for job, target in (("kvmesh-controller", mesh.http_port), ("kvmesh-agent", mesh.agent_metrics_port)):
        poll(f"Prometheus scrapes {job}", lambda job=job, target=target: prometheus.value(
            f'up{{job="{job}",instance="127.0.0.1:{target}"}}') == 1, proc_logs=logs)
    completed = poll("the completed compress in kvmesh_events_total", lambda: prometheus.value(
        'sum(kvmesh_events_total{operation="compress",outcome="completed"})'), proc_logs=logs)
    assert completed >= 1
    assert prometheus.value('sum(kvmesh_events_total{operation="compress",outcome="failed"})') in (None, 0.0)
    chunks = poll("the agent's compressed chunks", lambda: prometheus.value(
        f'sum(kvmesh_agent_chunks_total{{operation="compress",outcome="ok",location="{LOCATION}"}})'),
        proc_logs=logs)
    assert chunks == NUM_CHUNKS
    ratio = prometheus.value(f'kvmesh_compression_ratio{{method="{METHOD}",location="{LOCATION}"}}')
    assert ratio is not None and math.isclose(ratio, mesh.event["compression_ratio"], rel_tol=1e-9)
    assert ratio > 1
    assert prometheus.value('kvmesh_workers{state="up"}') >= 1
    assert prometheus.value("kvmesh_agent_controller_connected") == 1
    encoded = prometheus.value(f'kvmesh_agent_stored_chunks{{form="encoded",location="{LOCATION}"}}')
    assert encoded == NUM_CHUNKS
    workers = http_json("POST", f"http://127.0.0.1:{mesh.http_port}/query_worker_info", {"instance_id": INSTANCE_ID})
    assert len(workers["worker_infos"]) == 1


def test_real_prometheus_evaluates_every_alert_rule(mesh: Mesh, prometheus: Prometheus) -> None:
    def rules() -> list[dict] | None:
        groups = http_json("GET", f"{prometheus.url}/api/v1/rules")["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        if not loaded or any(r["health"] != "ok" for r in loaded):
            return None
        down = next(r for r in loaded if r["name"] == "KVMeshAgentDown")
        return loaded if down["state"] != "inactive" else None

    loaded = poll("every rule evaluated without error, KVMeshAgentDown pending for the dead agent", rules)
    assert {r["name"] for r in loaded} == {r["alert"] for r in ALERT_RULES}
    # The dead agent (and only it) trips KVMeshAgentDown; on the healthy mesh every other rule is quiet.
    by_name = {r["name"]: r for r in loaded}
    alerts = by_name.pop("KVMeshAgentDown")["alerts"]
    # (pending for its first 2 minutes, firing after: a slow machine may take that long to get here)
    assert [a["labels"]["instance"] for a in alerts] == [prometheus.dead_agent]
    assert alerts[0]["state"] in ("pending", "firing") and alerts[0]["labels"]["severity"] == "critical"
    assert {name: r["state"] for name, r in by_name.items() if r["state"] != "inactive"} == {}
    assert prometheus.value(f'up{{job="kvmesh-agent",instance="127.0.0.1:{mesh.agent_metrics_port}"}}') == 1


def test_real_prometheus_computes_the_latency_quantile(mesh: Mesh, prometheus: Prometheus) -> None:
    # The latency alert's quantile, over the cumulative buckets (the one compress happened before
    # the first scrape, so a rate would be 0): it lands in the bucket of the event's real duration.
    expr = "histogram_quantile(0.95, sum by (operation, le) (kvmesh_event_duration_seconds_bucket))"
    result = poll("the quantile", lambda: prometheus.query(expr))
    (series,) = [r for r in result if r["metric"].get("operation") == "compress"]
    p95 = float(series["value"][1])
    duration = mesh.event["finished_time"] - mesh.event["created_time"]
    bounds = sorted(float(b["metric"]["le"]) for b in prometheus.query(
        'kvmesh_event_duration_seconds_bucket{operation="compress"}'))
    upper = next(b for b in bounds if b >= duration)
    lower = max([0.0] + [b for b in bounds if b < duration])
    assert lower <= p95 <= upper, (p95, duration, lower, upper)
