"""The ``InstanceAgent`` gRPC service: thin conversions between messages and the agent's coroutines.

Domain errors become gRPC statuses in one place, ``_grpc_errors``; anything else is a bug, logged
with its traceback and answered INTERNAL. The server also runs the standard health service and
server reflection, and allows 1 GiB messages (a chunk of a large model's KV is hundreds of MiB).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.core.grpc_server import MeshServer
from kvmesh.errors import InvalidArgument, KVMeshError

from . import wire
from .results import Progress
from .tensors import from_proto, to_proto

if TYPE_CHECKING:
    from .agent import InstanceAgent

logger = logging.getLogger(__name__)

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["InstanceAgent"].full_name


async def _abort(context: grpc.aio.ServicerContext, method: str, err: BaseException) -> None:
    if isinstance(err, KVMeshError):
        await context.abort(err.grpc_code, err.message)
    logger.exception("InstanceAgent.%s failed", method, exc_info=err)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(err).__name__}: {err}")


def _grpc_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map ``KVMeshError`` (and bugs) raised by a unary or server-streaming handler to a status."""
    name = fn.__name__
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as err:
                await _abort(context, name, err)
        return stream

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _abort(context, name, err)
    return unary


class InstanceAgentServicer(agent_pb2_grpc.InstanceAgentServicer):
    """Messages in, plain values to the agent; its dataclasses back out as messages (``wire``).

    Tensor payloads (PutChunks, GetChunks, ReceiveChunks) are converted on a worker thread: a
    chunk of a large model is hundreds of MiB, and copying it must not stall the event loop.
    """

    def __init__(self, agent: InstanceAgent) -> None:
        self.agent = agent

    @staticmethod
    async def _stream(items: AsyncIterator[Progress]) -> AsyncIterator[agent_pb2.ProgressResponse]:
        async for item in items:
            yield wire.progress_to_proto(item)

    @_grpc_errors
    async def Compress(self, request: agent_pb2.CompressRequest, context: Any) -> AsyncIterator[agent_pb2.ProgressResponse]:
        stream = await self.agent.compress(list(request.tokens), request.method, request.location, request.event_id)
        async for msg in self._stream(stream):
            yield msg

    @_grpc_errors
    async def Decompress(self, request: agent_pb2.DecompressRequest,
                         context: Any) -> AsyncIterator[agent_pb2.ProgressResponse]:
        stream = await self.agent.decompress(list(request.tokens), request.method, request.location, request.event_id)
        async for msg in self._stream(stream):
            yield msg

    @_grpc_errors
    async def Move(self, request: agent_pb2.MoveRequest, context: Any) -> AsyncIterator[agent_pb2.ProgressResponse]:
        stream = await self.agent.move(list(request.tokens), request.location, request.target_url,
                                       request.target_location, request.copy, request.event_id)
        async for msg in self._stream(stream):
            yield msg

    @_grpc_errors
    async def Lookup(self, request: agent_pb2.LookupRequest, context: Any) -> agent_pb2.LookupResponse:
        matches = await self.agent.lookup_locations(list(request.tokens), request.location or None)
        return agent_pb2.LookupResponse(matches=[
            agent_pb2.LocationMatch(location=m.location, num_tokens=m.num_tokens, num_chunks=m.num_chunks)
            for m in matches])

    @_grpc_errors
    async def Clear(self, request: agent_pb2.ClearRequest, context: Any) -> agent_pb2.ClearResponse:
        n_tokens, n_chunks = await self.agent.clear(request.location or None, list(request.tokens))
        return agent_pb2.ClearResponse(num_tokens=n_tokens, num_chunks=n_chunks)

    @_grpc_errors
    async def Pin(self, request: agent_pb2.PinRequest, context: Any) -> agent_pb2.PinResponse:
        return agent_pb2.PinResponse(
            num_tokens=await self.agent.set_pinned(request.location or None, list(request.tokens), True))

    @_grpc_errors
    async def Unpin(self, request: agent_pb2.UnpinRequest, context: Any) -> agent_pb2.UnpinResponse:
        return agent_pb2.UnpinResponse(
            num_tokens=await self.agent.set_pinned(request.location or None, list(request.tokens), False))

    @_grpc_errors
    async def Health(self, request: agent_pb2.HealthRequest, context: Any) -> agent_pb2.HealthResponse:
        return wire.health_to_proto(await self.agent.health())

    @_grpc_errors
    async def PutChunks(self, request: agent_pb2.PutChunksRequest, context: Any) -> agent_pb2.PutChunksResponse:
        if not request.HasField("kv"):
            raise InvalidArgument("kv is required: the tensor [2, layers, len(tokens), channels] to store")
        kv = await asyncio.to_thread(from_proto, request.kv)
        _, chunks = await self.agent.put_chunks(list(request.tokens), kv, request.location or None, request.overwrite)
        covered = await self.agent.lookup(list(request.tokens), request.location or self.agent.location(None).name)
        return agent_pb2.PutChunksResponse(num_tokens=covered, chunks_stored=chunks)

    @_grpc_errors
    async def GetChunks(self, request: agent_pb2.GetChunksRequest, context: Any) -> agent_pb2.GetChunksResponse:
        n, kv = await self.agent.retrieve(list(request.tokens), request.location or None)
        if kv is None:
            return agent_pb2.GetChunksResponse(num_tokens=0)
        return agent_pb2.GetChunksResponse(num_tokens=n, kv=await asyncio.to_thread(to_proto, kv))

    @_grpc_errors
    async def ReceiveChunks(self, request: agent_pb2.ReceiveChunksRequest,
                            context: Any) -> agent_pb2.ReceiveChunksResponse:
        chunks = await asyncio.to_thread(lambda: [wire.chunk_from_proto(m, i) for i, m in enumerate(request.chunks)])
        stored = await self.agent.receive_chunks(request.location, chunks)
        return agent_pb2.ReceiveChunksResponse(chunks_stored=stored)

    @_grpc_errors
    async def Stats(self, request: agent_pb2.StatsRequest, context: Any) -> agent_pb2.StatsResponse:
        return wire.stats_to_proto(await self.agent.stats())


async def build_server(agent: InstanceAgent) -> tuple[MeshServer, int, int | None]:
    """A started server for ``agent``: (server, gRPC port, peer port or None).

    The mesh bootstrap (kvmesh.core.grpc_server) adds health, reflection, the token check and TLS
    from ``agent.config.security``; a bind beyond loopback with no token is refused.
    """
    from .lifecycle import GRPC_OPTIONS

    # No SO_REUSEPORT: a second agent on a taken port must fail, not share its traffic.
    server = MeshServer(agent.config.security, options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
    server.add_service(SERVICE_NAME, lambda s: agent_pb2_grpc.add_InstanceAgentServicer_to_server(
        InstanceAgentServicer(agent), s))
    host = agent.host
    port = server.bind(host, agent.grpc_port_wanted, "the agent's gRPC port")
    p2p_port = None
    wanted_p2p = agent.config.p2p_port(agent.worker_id) if agent.config.enable_p2p else None
    if wanted_p2p is not None:
        # Peers reach the same service on the p2p port: ReceiveChunks is how chunks travel.
        p2p_port = server.bind(host, wanted_p2p, "the agent's peer port")
    await server.start()
    return server, port, p2p_port
