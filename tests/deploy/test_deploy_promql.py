"""The PromQL checks the dashboard and alert tests rely on: they must catch what they claim to."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tests.deploy.promql import Exported, metric_names, problems, selectors


def exported() -> Exported:
    r = CollectorRegistry()
    Counter("kvmesh_events_total", "", ["operation", "outcome"], registry=r).labels("compress", "completed").inc()
    Histogram("kvmesh_event_duration_seconds", "", ["operation"], registry=r).labels("compress").observe(1)
    Gauge("kvmesh_untouched", "", ["location"], registry=r)  # labelled, no series yet
    out = Exported()
    out.add_exposition(generate_latest(r).decode())
    return out


def test_metric_names_skip_functions_keywords_labels_and_durations() -> None:
    expr = ('histogram_quantile(0.95, sum by (operation, le) (rate(kvmesh_event_duration_seconds_bucket'
            '{operation="compress"}[5m] offset 1h))) > 60 and on(instance) up{job="x"} == bool 1')
    assert metric_names(expr) == {"kvmesh_event_duration_seconds_bucket", "up"}
    assert selectors('a{x="1", y=~"b,c"} / b{z!="{"}') == [("a", {"x", "y"}), ("b", {"z"})]


def test_problems_find_unknown_metrics_labels_and_groupings() -> None:
    e = exported()
    ok = 'sum by (operation, le) (rate(kvmesh_event_duration_seconds_bucket{operation="compress"}[5m]))'
    assert problems(ok, e) == []
    assert problems('sum(rate(kvmesh_events_total{outcome="failed",instance=~".*"}[5m]))', e) == []
    assert problems("kvmesh_untouched", e) == []          # exported, only without series yet
    assert problems("kvmesh_event_duration_seconds_count", e) == []
    assert "no /metrics exports" in problems("rate(kvmesh_event_total[5m])", e)[0]
    assert "has no label ['outcom']" in problems('kvmesh_events_total{outcom="failed"}', e)[0]
    assert "groups by ['operaton']" in problems("sum by (operaton) (kvmesh_events_total)", e)[0]
    assert "selects no metric" in problems("vector(1)", e)[0]
