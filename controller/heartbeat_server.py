"""The heartbeat server: the Controller service's Heartbeat alone, on a gRPC server with an event loop
and a thread of its own.

Why: everything else the controller serves (admissions, a thousand event streams to the agents, the
HTTP gateway) runs on one asyncio loop. A loop that is merely *busy* (not stalled, so the registry's
stall credit does not apply) handles a heartbeat that arrives behind that work late, each of the
several hops of a gRPC call waiting its turn behind everything ready; late enough, a live worker was
marked down and admission answered 409 "workers down". Here no request can queue in front of a
heartbeat: this loop serves nothing else, and the only thing it shares with the busy one is the GIL,
which Python hands over every few milliseconds (``sys.getswitchinterval()``).

The server is a ``MeshServer`` like the main one (same token check, TLS, health service and
reflection), bound to the same host; its port is advertised to agents in ``RegisterWorkerResponse``.
The handler touches only the registry's liveness state, which a ``threading.Lock`` guards, and
never an asyncio object of the main loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Sequence
from typing import Any

from kvmesh.core.grpc_server import MeshServer
from kvmesh.core.security import SecuritySettings

from .grpc_service import generic_handler
from .rpc_table import SERVICE, Rpc

logger = logging.getLogger(__name__)

# Seconds to wait for the thread to start its server, and to end after being told to stop.
_START_TIMEOUT_S = 30.0
_JOIN_TIMEOUT_S = 30.0


class HeartbeatServer:
    """``port = await start()`` from the main loop, then ``await stop()``; serves ``rpcs`` (Heartbeat)."""

    def __init__(self, security: SecuritySettings, rpcs: Sequence[Rpc], host: str, port: int, *,
                 options: Sequence[tuple[str, Any]] = (), shutdown_grace: float = 1.0) -> None:
        if not rpcs:
            raise ValueError("the heartbeat server needs at least one RPC to serve")
        self._security = security
        self._rpcs = list(rpcs)
        self._host = host
        self._port = port
        self._options = list(options)
        self._grace = shutdown_grace
        self._ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    async def start(self) -> int:
        """Start the thread and its server; the bound port (OSError/BindRefused as ``MeshServer.bind``)."""
        self._thread = threading.Thread(target=self._run, name="kvmesh-controller-heartbeats", daemon=True)
        self._thread.start()
        try:
            self.port = await asyncio.wait_for(asyncio.wrap_future(self._ready), _START_TIMEOUT_S)
        except BaseException:
            await self.stop()
            raise
        return self.port

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as err:  # reported to start() when it had not answered yet
            if not self._ready.done():
                self._ready.set_exception(err)
            else:
                logger.exception("the heartbeat server's thread failed")
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = MeshServer(self._security, options=self._options)
        server.add_generic_handler(SERVICE.full_name, generic_handler(self._rpcs))
        port = server.bind(self._host, self._port, "the controller's heartbeat gRPC")
        await server.start()
        self._ready.set_result(port)
        try:
            await self._stop.wait()
        finally:
            await server.stop(self._grace)

    async def stop(self) -> None:
        """Stop the server (in-flight heartbeats get the grace period) and end the thread; again: nothing."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop already ended (its server failed to start)
                pass
        await asyncio.to_thread(thread.join, _JOIN_TIMEOUT_S)
        if thread.is_alive():
            logger.warning("the heartbeat server's thread did not end within %.0fs", _JOIN_TIMEOUT_S)
