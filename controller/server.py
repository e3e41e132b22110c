"""The controller process's servers: gRPC (with health and reflection) and the HTTP gateway.

``ControllerServer`` owns one ``ControllerService`` and serves it on both transports; tests run it
in-process on port 0, ``kvmesh-controller`` runs it until SIGTERM/SIGINT.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .gateway import Gateway
from .grpc_service import generic_handler
from .httpd import HttpServer
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
        self.gateway = Gateway(self.rpcs, self.metrics)
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._http = HttpServer(self.gateway.handle, self.settings.host, self.settings.port,
                                max_header_bytes=self.settings.max_header_bytes,
                                max_body_bytes=self.settings.max_body_bytes)
        self._sweeper: asyncio.Task[None] | None = None
        self.grpc_port = 0

    @property
    def http_port(self) -> int:
        return self._http.port

    async def start(self) -> None:
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        server.add_generic_rpc_handlers((generic_handler(self.rpcs),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.grpc_port = server.add_insecure_port(f"{self.settings.host}:{self.settings.monitor_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {self.settings.host}:{self.settings.monitor_port}")
        await server.start()
        self._grpc = server
        await self._http.start()
        self._sweeper = asyncio.create_task(self._sweep_loop())
        for name in ("", SERVICE.full_name):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("controller serving HTTP on %s:%s and gRPC on %s:%s", self.settings.host, self.http_port,
                    self.settings.host, self.grpc_port)

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
        if self._grpc is not None:
            await self._grpc.stop(self.settings.shutdown_grace)
            self._grpc = None
        await self._http.stop()
        logger.info("controller stopped")
