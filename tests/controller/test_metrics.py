"""/metrics on the gateway port: Prometheus text, parsed, with exactly the contract's names."""
from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from kvmesh.controller.metrics import ControllerMetrics

from .harness import ControllerThread

# docs/CONTRACTS.md, the controller's list (family names as the parser reports them).
CONTRACT = {
    "kvmesh_events": "counter",
    "kvmesh_events_in_flight": "gauge",
    "kvmesh_event_duration_seconds": "histogram",
    "kvmesh_requests": "counter",
    "kvmesh_request_duration_seconds": "histogram",
    "kvmesh_workers": "gauge",
    "kvmesh_chunks": "counter",
    "kvmesh_bytes_before": "counter",
    "kvmesh_bytes_after": "counter",
    "kvmesh_compression_ratio": "gauge",
    "kvmesh_admission_refused": "counter",
    "kvmesh_watchers_dropped": "counter",
    "kvmesh_admission_lookups": "counter",
    "kvmesh_loop_lag_seconds": "gauge",
    "kvmesh_workers_marked_down": "counter",
    "kvmesh_events_answered_from_index": "counter",
}


def scrape(c: ControllerThread) -> dict[str, object]:
    r = c.http("GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.body.decode())}


def value(families: dict[str, object], family: str, sample: str, **labels: str) -> float | None:
    for s in families[family].samples:  # type: ignore[attr-defined]
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_metric_names_and_types_follow_the_contract() -> None:
    families = {f.name: f.type for f in ControllerMetrics().registry.collect()}
    assert families == CONTRACT


def test_scrape_counts_requests_and_workers(controller: ControllerThread) -> None:
    controller.register("inst", 0)
    controller.register("inst", 1, heartbeat=0.05)
    controller.post("/lookup", {"tokens": [1, 2]})
    controller.post("/lookup", {"tokens": [-1]})
    controller.post("/health", {"instance_id": "ghost"})
    controller.post("/lookup", raw=b"{")
    fams = scrape(controller)
    assert set(CONTRACT) <= set(fams)
    assert value(fams, "kvmesh_requests", "kvmesh_requests_total", rpc="Lookup", code="OK") == 1
    assert value(fams, "kvmesh_requests", "kvmesh_requests_total", rpc="Lookup", code="INVALID_ARGUMENT") == 2
    assert value(fams, "kvmesh_requests", "kvmesh_requests_total", rpc="Health", code="NOT_FOUND") == 1
    assert value(fams, "kvmesh_requests", "kvmesh_requests_total", rpc="RegisterWorker", code="OK") == 2
    # The malformed body never reached the RPC: counted, not timed.
    assert value(fams, "kvmesh_request_duration_seconds", "kvmesh_request_duration_seconds_count", rpc="Lookup") == 2
    # Worker 1 announced 50 ms heartbeats and sends none: it goes down, worker 0 (no interval) stays up.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        fams = scrape(controller)
        if value(fams, "kvmesh_workers", "kvmesh_workers", state="down") == 1:
            break
        time.sleep(0.05)
    assert value(fams, "kvmesh_workers", "kvmesh_workers", state="down") == 1
    assert value(fams, "kvmesh_workers", "kvmesh_workers", state="up") == 1


def test_each_controller_has_its_own_registry() -> None:
    with ControllerThread() as a, ControllerThread() as b:
        a.post("/lookup", {"tokens": [1]})
        assert value(scrape(a), "kvmesh_requests", "kvmesh_requests_total", rpc="Lookup", code="OK") == 1
        assert value(scrape(b), "kvmesh_requests", "kvmesh_requests_total", rpc="Lookup", code="OK") is None
