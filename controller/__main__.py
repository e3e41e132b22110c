"""``kvmesh-controller``: the controller process (HTTP gateway + /metrics, gRPC Controller)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from kvmesh.core.auth import TokenFileError
from kvmesh.core.requestid import configure_logging
from kvmesh.core.security import SecuritySettings

from .server import ControllerServer
from .settings import ControllerSettings

logger = logging.getLogger("kvmesh.controller")


def parse_args(argv: Sequence[str] | None = None) -> ControllerSettings:
    d = ControllerSettings()
    p = argparse.ArgumentParser(prog="kvmesh-controller", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=d.host, help="address to bind both servers to (default: %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="HTTP/JSON gateway and /metrics (default: %(default)s)")
    p.add_argument("--monitor-port", type=int, default=d.monitor_port,
                   help="gRPC Controller service, for agents and stubs (default: %(default)s)")
    p.add_argument("--heartbeat-port", type=int, default=d.heartbeat_port,
                   help="agents' heartbeats, served on a thread of their own so that no request delays them; "
                        "advertised to agents when they register (default: %(default)s, a free port; "
                        "-1: none, heartbeats go to --monitor-port)")
    p.add_argument("--health-check-interval", type=float, default=d.health_check_interval,
                   help="seconds between worker liveness checks (default: %(default)s)")
    p.add_argument("--lmcache-worker-timeout", type=float, default=d.worker_timeout, dest="worker_timeout",
                   help="drop a worker silent this many seconds (default: %(default)s)")
    p.add_argument("--missed-heartbeats", type=int, default=d.missed_heartbeats,
                   help="mark a worker down after this many missed heartbeats (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="refuse requests with more tokens (HTTP 413) (default: %(default)s)")
    p.add_argument("--event-ttl", type=float, default=d.event_ttl,
                   help="seconds an ended event is kept (default: %(default)s)")
    p.add_argument("--max-events", type=int, default=d.max_events,
                   help="most events kept (default: %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=d.max_in_flight,
                   help="most events pending or running at once; more answer 429 (default: %(default)s)")
    p.add_argument("--watch-queue-size", type=int, default=d.watch_queue_size,
                   help="updates a watcher may fall behind before it is dropped (default: %(default)s)")
    p.add_argument("--max-watchers", type=int, default=d.max_watchers,
                   help="most event watches open at once (default: %(default)s)")
    p.add_argument("--event-db", default=d.event_db,
                   help="SQLite file events persist in, so they survive a restart (default: "
                        "controller-events-<monitor port>.sqlite3 under the state dir, memory only with "
                        "--monitor-port 0; ':memory:' keeps them in memory only)")
    p.add_argument("--state-dir", default=d.state_dir,
                   help="folder of the default event database (default: $KVMESH_STATE_DIR, else "
                        "~/.local/state/kvmesh)")
    p.add_argument("--min-chunk-size", type=int, default=d.min_chunk_size,
                   help="refuse agents registering a smaller chunk_size (default: %(default)s)")
    p.add_argument("--max-chunk-size", type=int, default=d.max_chunk_size,
                   help="refuse agents registering a larger chunk_size (default: %(default)s)")
    p.add_argument("--max-workers", type=int, default=d.max_workers,
                   help="most workers registered at once (default: %(default)s)")
    p.add_argument("--chunk-timeout", type=float, default=d.chunk_timeout,
                   help="seconds a streamed agent operation may take per chunk, on top of --agent-timeout "
                        "and at most --event-timeout in all (default: %(default)s)")
    p.add_argument("--agent-timeout", type=float, default=d.agent_timeout,
                   help="deadline of unary calls to agents, seconds (default: %(default)s)")
    p.add_argument("--event-timeout", type=float, default=d.event_timeout,
                   help="deadline of a streamed agent operation, seconds (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="refuse HTTP request bodies over this many bytes (413) (default: %(default)s)")
    p.add_argument("--max-total-body-bytes", type=int, default=d.max_total_body_bytes,
                   help="request body bytes held at once over all HTTP connections; beyond, 429 with "
                        "Retry-After (default: %(default)s)")
    p.add_argument("--http-max-connections", type=int, default=d.http_max_connections,
                   help="open HTTP connections, watch streams included; beyond, 503 (default: %(default)s)")
    p.add_argument("--http-body-timeout", type=float, default=d.http_body_timeout,
                   help="seconds an HTTP request body may take to arrive; slower ones get 408 (default: %(default)s)")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help="refuse HTTP request headers over this many bytes (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    SecuritySettings.add_arguments(p)
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    own = {"log_level", "auth_token_file", "tls_cert", "tls_key", "tls_ca", "insecure"}
    values = {k: v for k, v in vars(args).items() if k not in own}
    try:
        return ControllerSettings(**values, security=SecuritySettings.from_args(args))
    except ValueError as err:
        p.error(str(err))
        raise  # unreachable: p.error exits


async def serve(settings: ControllerSettings) -> None:
    server = ControllerServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("signal received: shutting down")
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        asyncio.run(serve(settings))
    except (OSError, TokenFileError) as err:
        logger.error("cannot start the controller: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
