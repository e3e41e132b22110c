"""The agent's Prometheus metrics (names as in docs/CONTRACTS.md), one registry per agent."""
from __future__ import annotations

import json
import logging
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from kvmesh.core.auth import bearer_ok
from kvmesh.core.security import NO_SECURITY, SecuritySettings

logger = logging.getLogger(__name__)

_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RATIO_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 50.0)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """No access log on stderr (scrapes every few seconds would drown the agent's own log)."""


def _with_token(app: Callable[..., Iterable[bytes]], token: str | None) -> Callable[..., Iterable[bytes]]:
    """``app`` behind the shared bearer token, as Prometheus sends it (``authorization`` in its scrape
    config); no token configured: ``app`` itself."""
    if token is None:
        return app

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if bearer_ok(environ.get("HTTP_AUTHORIZATION"), token):
            return app(environ, start_response)
        body = json.dumps({"error": "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                                    "(Prometheus: authorization.credentials_file in the scrape config)",
                           "code": "UNAUTHENTICATED"}).encode()
        start_response("401 Unauthorized", [("Content-Type", "application/json"), ("WWW-Authenticate", "Bearer"),
                                            ("Content-Length", str(len(body)))])
        return [body]
    return guarded


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

    def serve(self, port: int, host: str = "127.0.0.1", security: SecuritySettings = NO_SECURITY) -> int:
        """Serve /metrics on ``host:port`` (0: a free port) in a daemon thread; returns the port.

        With a token configured every scrape needs it; with a certificate it is HTTPS (and with a CA,
        scrapers must present a certificate it signed), as on the agent's gRPC port.
        """
        app = _with_token(make_wsgi_app(self.registry), security.token)
        httpd = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
        if security.tls_cert and security.tls_key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(security.tls_cert, security.tls_key)
            if security.tls_ca:
                ctx.load_verify_locations(security.tls_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        thread = threading.Thread(target=httpd.serve_forever, name="agent-metrics", daemon=True)
        thread.start()
        self._http, self._thread = httpd, thread
        bound = int(httpd.server_port)
        scheme = "https" if security.tls_cert else "http"
        logger.info("agent metrics on %s://%s:%d/metrics%s", scheme, host, bound,
                    " (bearer token required)" if security.token else "")
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
