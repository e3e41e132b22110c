"""The heartbeat server: the Controller service's Heartbeat alone, on a gRPC server of its own whose
calls never touch the controller's event loop.

Why: everything else the controller serves (admissions, a thousand event streams to the agents, the
HTTP gateway) runs on one asyncio loop. A loop that is merely *busy* (not stalled, so the registry's
stall credit does not apply) handles a heartbeat that arrives behind that work late, each of the
several hops of a gRPC call waiting its turn behind everything ready; late enough, a live worker was
marked down and admission answered 409 "workers down". Here no request can queue in front of a
heartbeat: gRPC's own threads receive it and a small thread pool answers it, sharing with the busy
loop only the GIL, which Python hands over every few milliseconds (``sys.getswitchinterval()``).

It is grpcio's thread-based server rather than a second ``grpc.aio`` server on a second event loop:
measured with ``bench/bench_admission.py``, a second asyncio gRPC server in the process made every call
on the main one cost 20-40% more CPU; this one costs nothing measurable. It answers as the main server
does: the same bearer token (UNAUTHENTICATED otherwise), TLS when configured, no bind beyond loopback
without a token, the standard health service open to probes. Its port is advertised to agents in
``RegisterWorkerResponse.heartbeat_port``. The handler touches only the registry's liveness state,
which a ``threading.Lock`` guards, and never an asyncio object of the main loop.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.core.auth import METADATA_KEY, bearer_ok
from kvmesh.core.grpc_server import OPEN_SERVICES, UNAUTHENTICATED_DETAIL
from kvmesh.core.security import SecuritySettings
from kvmesh.errors import KVMeshError

from .rpc_table import SERVICE

logger = logging.getLogger(__name__)

# Threads answering heartbeats (each call holds one for microseconds) and calls admitted at once; more
# wait in gRPC's queue rather than in an unbounded one of ours.
_WORKERS = 4
_MAX_CONCURRENT = 1024
HEARTBEAT_METHOD = f"/{SERVICE.full_name}/Heartbeat"

Beat = Callable[[pb.HeartbeatRequest], pb.HeartbeatResponse]


def _abort_unauthenticated(request: Any, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAIL)


# No deserializer: a refused call's bytes are never parsed.
_DENIED = grpc.unary_unary_rpc_method_handler(_abort_unauthenticated)


class _TokenCheck(grpc.ServerInterceptor):
    """Calls without ``authorization: Bearer <token>`` are refused (all but the health service)."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        if self._token is None or details.method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
            return continuation(details)
        value = next((v for k, v in details.invocation_metadata or () if k == METADATA_KEY), None)
        return continuation(details) if bearer_ok(value, self._token) else _DENIED


class HeartbeatServer:
    """``port = await start()``, then ``await stop()``; serves ``beat`` as the Controller's Heartbeat."""

    def __init__(self, security: SecuritySettings, beat: Beat, host: str, port: int, *,
                 options: Sequence[tuple[str, Any]] = (), shutdown_grace: float = 1.0) -> None:
        self._security = security
        self._beat = beat
        self._host = host
        self._port = port
        self._options = list(options)
        self._grace = shutdown_grace
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self.port = 0

    def _heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        try:
            return self._beat(request)
        except KVMeshError as err:
            context.abort(err.grpc_code, err.message)
        except Exception:  # a bug: logged here, never its text to the caller
            logger.exception("Heartbeat failed on the heartbeat server")
            context.abort(grpc.StatusCode.INTERNAL, "Heartbeat failed inside the controller (a bug)")
        raise AssertionError("unreachable: abort raises")

    async def start(self) -> int:
        """Bind and start (OSError when the port cannot be bound, BindRefused beyond loopback with
        no token); the bound port."""
        self._security.check_bind(self._host, "the controller's heartbeat gRPC")
        server = grpc.server(ThreadPoolExecutor(_WORKERS, thread_name_prefix="kvmesh-controller-heartbeats"),
                             options=self._options, interceptors=[_TokenCheck(self._security.token)],
                             maximum_concurrent_rpcs=_MAX_CONCURRENT)
        handler = grpc.unary_unary_rpc_method_handler(self._heartbeat, pb.HeartbeatRequest.FromString,
                                                      pb.HeartbeatResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE.full_name, {"Heartbeat": handler}),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{self._host}:{self._port}"
        creds = self._security.server_credentials()
        try:
            port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
        except RuntimeError as err:
            raise OSError(f"cannot bind the controller's heartbeat gRPC to {address}: {err}") from err
        if port == 0:
            raise OSError(f"cannot bind the controller's heartbeat gRPC to {address} (in use?)")
        server.start()
        for name in ("", SERVICE.full_name):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self.port = port
        return port

    async def stop(self) -> None:
        """Stop (in-flight heartbeats get the grace period); again: nothing."""
        server, self._server = self._server, None
        if server is None:
            return
        self._health.enter_graceful_shutdown()
        await asyncio.to_thread(lambda: server.stop(self._grace).wait())
