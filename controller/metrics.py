"""The controller's Prometheus metrics, in a registry of its own (several controllers per process in tests).

Names are the ones docs/CONTRACTS.md fixes for the dashboards and alerts.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ControllerMetrics", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_EVENT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class ControllerMetrics:
    """Every controller metric, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        op_labels = ["operation", "method", "location"]
        self.events_total = Counter(
            "kvmesh_events_total", "Events finished, by operation, method, location and outcome.",
            [*op_labels, "outcome"], registry=r)
        self.events_in_flight = Gauge(
            "kvmesh_events_in_flight", "Events pending or running.", ["operation"], registry=r)
        self.event_duration_seconds = Histogram(
            "kvmesh_event_duration_seconds", "Time from an event's creation to its end.",
            ["operation"], buckets=_EVENT_BUCKETS, registry=r)
        self.requests_total = Counter(
            "kvmesh_requests_total", "Controller RPCs (gateway calls included), by gRPC code name.",
            ["rpc", "code"], registry=r)
        self.request_duration_seconds = Histogram(
            "kvmesh_request_duration_seconds", "Controller RPC latency.", ["rpc"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.workers = Gauge("kvmesh_workers", "Registered workers by state.", ["state"], registry=r)
        self.chunks_total = Counter(
            "kvmesh_chunks_total", "Chunks processed by events.", op_labels, registry=r)
        self.bytes_before_total = Counter(
            "kvmesh_bytes_before_total", "Stored bytes of processed chunks before the operation.",
            op_labels, registry=r)
        self.bytes_after_total = Counter(
            "kvmesh_bytes_after_total", "Stored bytes of processed chunks after the operation.",
            op_labels, registry=r)
        self.compression_ratio = Gauge(
            "kvmesh_compression_ratio", "Bytes before / after of the last completed compress.",
            ["method", "location"], registry=r)
        self.admission_refused_total = Counter(
            "kvmesh_admission_refused_total", "Operations refused because a bound was reached (HTTP 429).",
            ["reason"], registry=r)
        self.watchers_dropped_total = Counter(
            "kvmesh_watchers_dropped_total", "Event watchers dropped for falling too far behind.", registry=r)
        self.admission_lookups_total = Counter(
            "kvmesh_admission_lookups_total",
            "Stored-prefix lookups of operations, by source: the controller's index or an agent round trip.",
            ["source"], registry=r)
        self.events_answered_from_index_total = Counter(
            "kvmesh_events_answered_from_index_total",
            "Compress/decompress events ended at admission with no agent call: the index held every chunk "
            "already in the asked form.", ["operation"], registry=r)
        self.workers_marked_down_total = Counter(
            "kvmesh_workers_marked_down_total", "Workers marked down for missing their heartbeats.", registry=r)
        self.loop_lag_seconds = Gauge(
            "kvmesh_loop_lag_seconds", "How late the controller's liveness sweep last ran (event-loop stall).",
            registry=r)
        # Both states always present so dashboards see 0 rather than no series.
        self.workers.labels(state="up").set(0)
        self.workers.labels(state="down").set(0)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
