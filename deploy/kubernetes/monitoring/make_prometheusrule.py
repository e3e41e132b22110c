#!/usr/bin/env python3
"""Writes prometheusrule.yaml: deploy/prometheus/alerts.yml wrapped as a Prometheus Operator
PrometheusRule, so both ways of running Prometheus load the same rules. Run after editing alerts.yml
(tests/deploy checks that the two agree):  python deploy/kubernetes/monitoring/make_prometheusrule.py
"""
from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent.parent / "prometheus" / "alerts.yml"
OUT = HERE / "prometheusrule.yaml"
HEADER = "# Generated from deploy/prometheus/alerts.yml by make_prometheusrule.py: edit alerts.yml, then rerun it.\n"


def prometheus_rule(alerts: dict) -> dict:
    """The PrometheusRule object holding ``alerts``' groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "kvmesh",
            "labels": {"app.kubernetes.io/name": "kvmesh", "app.kubernetes.io/part-of": "kvmesh"},
        },
        "spec": {"groups": alerts["groups"]},
    }


def main() -> None:
    alerts = yaml.safe_load(ALERTS.read_text())
    OUT.write_text(HEADER + yaml.safe_dump(prometheus_rule(alerts), sort_keys=False, width=100))


if __name__ == "__main__":
    main()
