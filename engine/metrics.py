"""The embedded engine's Prometheus metrics (the agent's own are served beside them)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineMetrics:
    """One set per server, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("kvmesh_engine_requests_total", "HTTP requests by route and status code",
                                ["route", "code"], registry=registry)
        self.prompt_tokens = Counter("kvmesh_engine_prompt_tokens_total", "Prompt tokens of completions",
                                     registry=registry)
        self.cached_tokens = Counter("kvmesh_engine_cached_prompt_tokens_total",
                                     "Prompt tokens whose KV was loaded through the agent instead of prefilled",
                                     registry=registry)
        self.stored_tokens = Counter("kvmesh_engine_stored_prompt_tokens_total",
                                     "Prompt tokens whose KV was stored through the agent", registry=registry)
        self.generation_tokens = Counter("kvmesh_engine_generation_tokens_total", "Tokens generated",
                                         registry=registry)
        self.ttft = Histogram("kvmesh_engine_time_to_first_token_seconds",
                              "From a completion's arrival to its first token", ["cache_hit"],
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.duration = Histogram("kvmesh_engine_request_duration_seconds", "Completion requests, whole",
                                  buckets=_LATENCY_BUCKETS, registry=registry)
