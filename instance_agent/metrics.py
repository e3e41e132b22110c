"""The agent's Prometheus metrics (names as in docs/CONTRACTS.md), one registry per agent."""
from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RATIO_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 50.0)


class AgentMetrics:
    """Counters, gauges and histograms of one agent, in a registry of its own.

    A registry per agent lets several agents live in one process (an engine with several workers,
    or the tests) without their series colliding.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.chunks = Counter("kvmesh_agent_chunks", "Chunks handled by operation, method, location and outcome",
                              ["operation", "method", "location", "outcome"], registry=r)
        self.codec_input_bytes = Counter("kvmesh_agent_codec_input_bytes", "Bytes given to codecs",
                                         ["operation", "method"], registry=r)
        self.codec_output_bytes = Counter("kvmesh_agent_codec_output_bytes", "Bytes produced by codecs",
                                          ["operation", "method"], registry=r)
        self.codec_seconds = Histogram("kvmesh_agent_codec_seconds", "Codec time per chunk",
                                       ["operation", "method"], buckets=_SECONDS_BUCKETS, registry=r)
        self.compression_ratio = Histogram("kvmesh_agent_compression_ratio",
                                           "Raw bytes over encoded bytes, per compressed chunk",
                                           ["method"], buckets=_RATIO_BUCKETS, registry=r)
        self.storage_used = Gauge("kvmesh_agent_storage_used_bytes", "Bytes stored per location",
                                  ["location"], registry=r)
        self.storage_capacity = Gauge("kvmesh_agent_storage_capacity_bytes", "Capacity per location",
                                      ["location"], registry=r)
        self.stored_chunks = Gauge("kvmesh_agent_stored_chunks", "Chunks stored per location and form",
                                   ["location", "form"], registry=r)
        self.evictions = Counter("kvmesh_agent_evictions", "Chunks evicted to make room, per location",
                                 ["location"], registry=r)
        self.controller_connected = Gauge("kvmesh_agent_controller_connected",
                                          "1 while the agent is registered with its controller", registry=r)
        self._http: Any = None
        self._thread: Any = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on ``host:port`` (0: a free port) in a daemon thread; returns the port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        logger.info("agent metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
