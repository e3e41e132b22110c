"""The controller process's servers: gRPC (with health and reflection) and the HTTP gateway (uvicorn).

``ControllerServer`` owns one ``ControllerService`` and serves it on both transports; tests run it
in-process on port 0, ``kvmesh-controller`` runs it until SIGTERM/SIGINT.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.errors import KVMeshError

from kvmesh.core.grpc_server import HealthService, MeshServer

from .gateway import Gateway, GatewayLimits
from .grpc_service import generic_handler
from .heartbeat_server import HeartbeatServer
from .http_server import UvicornServer
from .metrics import ControllerMetrics
from .rpc_table import SERVICE, build
from .service import ControllerService
from .settings import ControllerSettings

logger = logging.getLogger(__name__)

_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class ControllerServer:
    """Both servers and the liveness loop; ``await start()``, then ``await stop()``."""

    def __init__(self, settings: ControllerSettings | None = None) -> None:
        self.settings = settings or ControllerSettings()
        self.metrics = ControllerMetrics()
        self.service = ControllerService(self.settings, self.metrics)
        self.rpcs = build(self.service.handlers(), self.metrics)
        s = self.settings
        sec = s.security
        self.auth_token = sec.token
        limits = GatewayLimits(max_header_bytes=s.max_header_bytes, max_body_bytes=s.max_body_bytes,
                               max_total_body_bytes=s.max_total_body_bytes, max_tokens=s.max_tokens,
                               body_timeout=s.http_body_timeout)
        self.gateway = Gateway(self.rpcs, self.metrics, limits, token=self.auth_token)
        self._grpc: MeshServer | None = None
        self._health = HealthService()
        self._http = UvicornServer(self.gateway.app, s.host, s.port, max_header_bytes=s.max_header_bytes, tls=sec.tls,
                                   shutdown_grace=s.shutdown_grace, max_connections=s.http_max_connections)
        self._sweeper: asyncio.Task[None] | None = None
        self.grpc_port = 0
        self._heartbeats: HeartbeatServer | None = None
        if s.heartbeat_port >= 0:
            self._heartbeats = HeartbeatServer(sec, self._counted_beat, s.host, s.heartbeat_port,
                                               options=_GRPC_OPTIONS, shutdown_grace=min(1.0, s.shutdown_grace))

    def _counted_beat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        """A heartbeat on the heartbeat server's threads, counted and timed as every Controller RPC."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return self.service.beat(req)
        except KVMeshError as err:
            code = err.grpc_code
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            m = self.metrics
            m.requests_total.labels(rpc="Heartbeat", code=code.name).inc()
            m.request_duration_seconds.labels(rpc="Heartbeat").observe(time.perf_counter() - start)

    @property
    def heartbeat_port(self) -> int:
        """The heartbeat server's port (0 when there is none)."""
        return self.service.heartbeat_port

    @property
    def http_port(self) -> int:
        return self._http.port

    async def start(self) -> None:
        server = MeshServer(self.settings.security, options=_GRPC_OPTIONS, health_servicer=self._health)
        server.add_generic_handler(SERVICE.full_name, generic_handler(self.rpcs))
        self.grpc_port = server.bind(self.settings.host, self.settings.monitor_port, "the controller's gRPC")
        await server.start(serving=False)
        self._grpc = server
        try:
            if self._heartbeats is not None:
                self.service.heartbeat_port = await self._heartbeats.start()
            await self._http.start()
        except BaseException:
            if self._heartbeats is not None:
                await self._heartbeats.stop()
            await server.stop(None)
            self._grpc = None
            raise
        self._sweeper = asyncio.create_task(self._sweep_loop())
        await server.set_serving()
        logger.info("controller serving HTTP%s on %s:%s and gRPC on %s:%s (heartbeats: %s)",
                    "S" if self._http.tls else "", self.settings.host, self.http_port, self.settings.host,
                    self.grpc_port, f"port {self.heartbeat_port}" if self.heartbeat_port else "the gRPC port")

    async def _sweep_loop(self) -> None:
        # The service's sweeper measures the loop's stalls, so that they never count as worker silence.
        await self.service.run_sweeper()

    async def stop(self) -> None:
        """Stop accepting, let in-flight RPCs finish within the grace period, cancel events."""
        await self._health.enter_graceful_shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.service.close()
        if self._heartbeats is not None:
            await self._heartbeats.stop()
        if self._grpc is not None:
            await self._grpc.stop(self.settings.shutdown_grace)
            self._grpc = None
        await self._http.stop()
        self.gateway.close()
        logger.info("controller stopped")
