"""deploy/grafana: the dashboard is well-formed, covers what an operator needs, uses only metrics and
labels the running controller and agent export, and every query runs on a real Prometheus."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy.mesh import Mesh, Prometheus, poll
from tests.deploy.deploy_support import DEPLOY
from tests.deploy.promql import Exported, metric_names, problems

GRAFANA = DEPLOY / "grafana"
DASHBOARD = json.loads((GRAFANA / "kvmesh-dashboard.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
VARIABLES = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
# What Grafana puts in place of its variables, for running the queries outside Grafana.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s",
                 "$instance": ".*", "$method": ".*"}


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and every query variable."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in PANELS for t in p["targets"]]
    for v in VARIABLES.values():
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"])
            assert m, f"variable {v['name']}: unexpected query {v['query']}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def substituted(expr: str) -> str:
    for var, value in sorted(SUBSTITUTIONS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown variable in {expr!r}"
    return expr


def test_dashboard_is_well_formed() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"] and DASHBOARD["schemaVersion"] >= 36
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    for p in PANELS:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"]
    assert VARIABLES["datasource"]["type"] == "datasource" and VARIABLES["datasource"]["query"] == "prometheus"
    used = {m for _, e in expressions() for m in re.findall(r"\$(\w+)", e) if not m.startswith("__")}
    assert used <= set(VARIABLES), f"undefined variables {used - set(VARIABLES)}"


def test_dashboard_covers_the_operators_questions() -> None:
    def panels_using(pattern: str) -> list[str]:
        return [p["title"] for p in PANELS if any(re.search(pattern, t["expr"]) for t in p["targets"])]

    assert panels_using(r"sum by \(operation, outcome\) \(rate\(kvmesh_events_total"), "events by outcome"
    assert panels_using(r"kvmesh_compression_ratio\b"), "compression ratio"
    assert panels_using(r"kvmesh_bytes_before_total.*-.*kvmesh_bytes_after_total"), "bytes saved"
    assert panels_using(r"kvmesh_agent_codec_input_bytes_total.*/.*kvmesh_agent_codec_seconds_sum"), "codec throughput"
    quantiles = {float(q) for p in PANELS for t in p["targets"]
                 for q in re.findall(r"histogram_quantile\(([\d.]+),\s*sum by \([^)]*\) \(rate\(kvmesh_event_duration_seconds_bucket", t["expr"])}
    assert {0.5, 0.95, 0.99} <= quantiles, "event latency percentiles"
    assert panels_using(r'kvmesh_workers\{state="up"\}'), "workers up"
    assert panels_using(r"sum by \(location\) \(kvmesh_agent_storage_used_bytes"), "storage per location"
    assert panels_using(r"kvmesh_engine_time_to_first_token_seconds_bucket"), "time to first token"


def engine_exposition() -> str:
    """The embedded engine's own metrics, from its real registry (running kvmesh-serve would load a
    model; its /metrics serves exactly this registry beside its agent's)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from kvmesh.engine.metrics import EngineMetrics

    registry = CollectorRegistry()
    EngineMetrics(registry)
    return generate_latest(registry).decode()


def test_dashboard_uses_exported_metrics_and_labels(mesh: Mesh) -> None:
    exported = Exported()
    exported.add_exposition(mesh.scrape(mesh.http_port))
    exported.add_exposition(mesh.scrape(mesh.agent_metrics_port))
    exported.add_exposition(engine_exposition())
    found = [f"{where}: {p}" for where, expr in expressions() for p in problems(expr, exported)]
    assert not found, "\n".join(found)
    # Every kvmesh metric the code exports is on some panel.
    def base(name: str) -> str:
        return re.sub(r"_(bucket|sum|count|total|created)$", "", name)

    on_dashboard = {base(n) for _, e in expressions() for n in metric_names(e)}
    exported_bases = {base(n) for n in exported.labels if n.startswith("kvmesh_")}
    assert exported_bases - on_dashboard == set(), "exported but on no panel"


def test_every_dashboard_query_runs_on_real_prometheus(mesh: Mesh, prometheus: Prometheus) -> None:
    agent = f"127.0.0.1:{mesh.agent_metrics_port}"
    poll("Prometheus has scraped the agent", lambda: prometheus.value(f'up{{instance="{agent}"}}') == 1)
    for where, expr in expressions():
        try:
            prometheus.query(substituted(expr))
        except Exception as err:  # noqa: BLE001 - report which query
            pytest.fail(f"{where}: {err}")
    # And the panels show the compress: the storage panel has the encoded chunks.
    stored = {r["metric"]["form"]: float(r["value"][1]) for r in prometheus.query(
        substituted(next(t["expr"] for p in PANELS if p["title"] == "Stored chunks by form" for t in p["targets"])))}
    assert stored["encoded"] > 0 and stored["raw"] == 0


def test_provisioning_points_at_the_dashboard() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert ds["apiVersion"] == 1 and source["type"] == "prometheus" and source["isDefault"] is True
    dashboards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "kvmesh.yaml").read_text())
    (provider,) = dashboards["providers"]
    assert dashboards["apiVersion"] == 1 and provider["type"] == "file"
    # The compose file mounts the dashboard where the provider looks.
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.startswith("../grafana/kvmesh-dashboard.json:") and
               m.split(":")[1].startswith(provider["options"]["path"] + "/") for m in mounts), mounts
