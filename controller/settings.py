"""The controller's settings (the command line fills them; tests build them directly)."""
from __future__ import annotations

from dataclasses import dataclass

from kvmesh.core.security import NO_SECURITY, SecuritySettings


@dataclass(frozen=True)
class ControllerSettings:
    host: str = "localhost"
    # HTTP/JSON gateway and /metrics (0: a free port).
    port: int = 9000
    # gRPC Controller service (0: a free port).
    monitor_port: int = 9001
    # How often worker liveness and the event table's bounds are checked.
    health_check_interval: float = 1.0
    # A worker silent this long is dropped from the registry (LMCache's --lmcache-worker-timeout).
    worker_timeout: float = 300.0
    # A worker that misses this many of its announced heartbeats is marked down.
    missed_heartbeats: int = 3
    # Requests with more tokens than this are refused with 413.
    max_tokens: int = 1 << 20
    # Ended events are kept this long, and at most this many events overall.
    event_ttl: float = 3600.0
    max_events: int = 10000
    # Deadline of unary calls to agents (lookup, health, clear, pin, ...).
    agent_timeout: float = 30.0
    # Deadline of a whole streamed agent operation (compress, decompress, move).
    event_timeout: float = 3600.0
    # HTTP request limits: headers, one body, and all bodies held at once over every connection.
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    max_total_body_bytes: int = 256 * 1024 * 1024
    # Open HTTP connections (watch streams included); beyond, uvicorn answers 503 at once.
    http_max_connections: int = 4096
    # Seconds a whole HTTP request body may take to arrive (408 after).
    http_body_timeout: float = 60.0
    # Grace period for in-flight RPCs at shutdown.
    shutdown_grace: float = 5.0
    # The shared bearer token and TLS files of both planes, gRPC and HTTP(S) (kvmesh.core.security); the
    # default has no token, which allows loopback only. kvmesh-controller loads it from its flags and the environment.
    security: SecuritySettings = NO_SECURITY

    def __post_init__(self) -> None:
        for name in ("health_check_interval", "worker_timeout", "event_ttl", "agent_timeout", "event_timeout",
                     "http_body_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("missed_heartbeats", "max_tokens", "max_events", "max_header_bytes", "max_body_bytes",
                     "max_total_body_bytes", "http_max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("port", "monitor_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
