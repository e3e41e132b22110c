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
    # Heartbeats only, served on a thread of their own so that no request can delay them; on --host,
    # advertised to agents when they register (0: a free port; -1: no such server, heartbeats are
    # served with everything else on monitor_port).
    heartbeat_port: int = 0
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
    # Events pending or running at once; over it compress/decompress/move/clear/pin/unpin answer
    # TooBusy (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED). Never more than max_events.
    max_in_flight: int = 1000
    # Updates a watcher may fall behind by before it is dropped (its stream ends with an error),
    # and watch streams open at once over all events.
    watch_queue_size: int = 256
    max_watchers: int = 1000
    # Where events persist (SQLite, WAL): "" = controller-events-<gRPC port>.sqlite3 under the
    # state dir (memory only when the gRPC port is 0: no stable name); ":memory:" = memory only.
    event_db: str = ""
    # Folder of the default event database ("" = $KVMESH_STATE_DIR, else ~/.local/state/kvmesh).
    state_dir: str = ""
    # A streamed agent operation (compress, decompress, move) gets agent_timeout plus this per chunk
    # asked for, never more than event_timeout.
    chunk_timeout: float = 30.0
    # Registrations with a chunk_size outside this range are refused (tiny chunks make every
    # lookup hash the tokens thousands of times; huge ones are not KV chunks).
    min_chunk_size: int = 16
    max_chunk_size: int = 65536
    # Bounds of the lookup index: admit/evict events in one ReportKVEvents, and chunk keys held
    # per worker (beyond it the worker's index is partial and admission asks the agent).
    max_kv_events_per_report: int = 50_000
    max_index_entries_per_worker: int = 1 << 20
    # Workers registered at once (new registrations beyond it are refused).
    max_workers: int = 4096
    # A chunk's progress may claim at most this many stored bytes per token (before or after).
    max_bytes_per_token: int = 4 << 20
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
        if not -1 <= self.heartbeat_port < 65536:
            raise ValueError(f"heartbeat_port must be in 0..65535 (0: a free port), or -1 for none, "
                             f"got {self.heartbeat_port}")
        self._check_state_bounds()

    def _check_state_bounds(self) -> None:
        """The event table's, registry's and index's bounds (kept apart from the transport settings)."""
        if self.chunk_timeout <= 0:
            raise ValueError(f"chunk_timeout must be positive, got {self.chunk_timeout}")
        for name in ("max_in_flight", "watch_queue_size", "max_watchers", "min_chunk_size", "max_kv_events_per_report",
                     "max_index_entries_per_worker", "max_bytes_per_token", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_chunk_size < self.min_chunk_size:
            raise ValueError(f"max_chunk_size ({self.max_chunk_size}) must be >= min_chunk_size "
                             f"({self.min_chunk_size})")
