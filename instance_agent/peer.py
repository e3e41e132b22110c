"""The client side of a move: another agent's ``InstanceAgent`` service, as the transfers use it."""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType

import grpc

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.core.channels import aio_channel
from kvmesh.core.security import NO_SECURITY, SecuritySettings

from .lifecycle import GRPC_OPTIONS
from .storage import StoredChunk
from .wire import chunk_to_proto

MOVE_CALL_TIMEOUT_S = 120.0
STATS_TIMEOUT_S = 10.0


def open_peer_channel(target_url: str, security: SecuritySettings = NO_SECURITY) -> grpc.aio.Channel:
    """The channel to a peer agent (one place to change how agents reach each other): the mesh's token
    and TLS settings, as every other call between processes."""
    return aio_channel(target_url, security, options=GRPC_OPTIONS)


class PeerClient:
    """``async with PeerClient(url) as peer``: send chunks to it, ask what it can decode."""

    def __init__(self, target_url: str, security: SecuritySettings = NO_SECURITY) -> None:
        self.target_url = target_url
        self._channel = open_peer_channel(target_url, security)
        self._stub = agent_pb2_grpc.InstanceAgentStub(self._channel)

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._channel.close()

    async def model_files(self) -> tuple[list[str], list[str]]:
        """(methods, model files) the peer advertises in its Stats."""
        resp = await self._stub.Stats(agent_pb2.StatsRequest(), timeout=STATS_TIMEOUT_S)
        return list(resp.methods), list(resp.model_files)

    async def send(self, location: str, chunks: Sequence[StoredChunk]) -> int:
        """Store ``chunks`` on the peer in ``location``; returns how many it stored (grpc.RpcError on failure)."""
        msgs = await asyncio.to_thread(lambda: [chunk_to_proto(c) for c in chunks])
        resp = await self._stub.ReceiveChunks(agent_pb2.ReceiveChunksRequest(location=location, chunks=msgs),
                                              timeout=MOVE_CALL_TIMEOUT_S)
        return resp.chunks_stored
