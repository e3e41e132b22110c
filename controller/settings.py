"""The controller's settings (the command line fills them; tests build them directly)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# ``--event-db`` values that keep events in memory only (nothing survives a restart).
EVENT_DB_DISABLED = frozenset({":memory:", "off", "none"})
ENV_STATE_DIR = "KVMESH_STATE_DIR"


def default_state_dir() -> Path:
    """``$KVMESH_STATE_DIR``, else ``$XDG_STATE_HOME/kvmesh``, else ``~/.local/state/kvmesh``."""
    explicit = os.environ.get(ENV_STATE_DIR, "").strip()
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "kvmesh"


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
    # Events pending or running at once; over it compress/decompress/move/clear/pin/unpin answer
    # TooBusy (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED). Never more than max_events.
    max_in_flight: int = 1000
    # Updates a watcher may fall behind by before it is dropped (its stream ends with an error),
    # and watch streams open at once over all events.
    watch_queue_size: int = 256
    max_watchers: int = 1000
    # Where events persist (SQLite, WAL): "" = controller-events-<gRPC port>.sqlite3 under the
    # state dir; ":memory:" (or "off") = memory only, nothing survives a restart.
    event_db: str = ""
    # Folder of the default event database ("" = $KVMESH_STATE_DIR or ~/.local/state/kvmesh).
    state_dir: str = ""
    # Deadline of unary calls to agents (lookup, health, clear, pin, ...).
    agent_timeout: float = 30.0
    # Deadline of a streamed agent operation (compress, decompress, move): agent_timeout plus
    # chunk_timeout per chunk asked for, and never over event_timeout.
    chunk_timeout: float = 30.0
    event_timeout: float = 3600.0
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
    # HTTP request limits.
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    # Grace period for in-flight RPCs at shutdown.
    shutdown_grace: float = 5.0

    def __post_init__(self) -> None:
        for name in ("health_check_interval", "worker_timeout", "event_ttl", "agent_timeout", "event_timeout",
                     "chunk_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("missed_heartbeats", "max_tokens", "max_events", "max_header_bytes", "max_body_bytes",
                     "max_in_flight", "watch_queue_size", "max_watchers", "min_chunk_size", "max_kv_events_per_report",
                     "max_index_entries_per_worker", "max_bytes_per_token", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_chunk_size < self.min_chunk_size:
            raise ValueError(f"max_chunk_size ({self.max_chunk_size}) must be >= min_chunk_size ({self.min_chunk_size})")
        for name in ("port", "monitor_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")

    def event_db_path(self, grpc_port: int) -> Path | None:
        """The SQLite file events persist in (None: memory only), for a controller on ``grpc_port``."""
        if self.event_db.strip().lower() in EVENT_DB_DISABLED:
            return None
        if self.event_db:
            return Path(self.event_db)
        state = Path(self.state_dir) if self.state_dir else default_state_dir()
        return state / f"controller-events-{grpc_port}.sqlite3"
