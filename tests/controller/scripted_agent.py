"""A scripted InstanceAgent: a real gRPC server on loopback whose streams say what a test tells them to.

Tests of the controller's own rules use it where a real agent cannot misbehave on demand: an agent
that reports forged progress, chunks that fail, or a stream that stays open until released. It
serves the real generated service (``agent_pb2_grpc``) on its own event-loop thread.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.api.common.v1 import common_pb2

# (request) -> the messages a stream sends (after which it ends), as an async iterator.
Script = Callable[[Any], AsyncIterator[agent_pb2.ProgressResponse]]


def chunk(index: int, chunk_size: int, num_tokens: int, before: int = 1000, after: int = 250,
          error: str = "", skipped: bool = False) -> agent_pb2.ProgressResponse:
    """One chunk's progress as a real agent would send it."""
    start, end = index * chunk_size, min((index + 1) * chunk_size, num_tokens)
    return agent_pb2.ProgressResponse(progress=common_pb2.ChunkProgress(
        chunk_index=index, chunk_key=f"{index:032x}", token_start=start, token_end=end, bytes_before=before,
        bytes_after=after if not error else 0, error=error, skipped=skipped, codec_seconds=0.01))


def final(num_tokens: int, chunks_total: int, chunks_done: int, error: str = "") -> agent_pb2.ProgressResponse:
    return agent_pb2.ProgressResponse(final=True, num_tokens=num_tokens, chunks_total=chunks_total,
                                      chunks_done=chunks_done, error=error)


class _Servicer(agent_pb2_grpc.InstanceAgentServicer):
    def __init__(self, owner: ScriptedAgent) -> None:
        self.owner = owner

    async def Lookup(self, request: Any, context: Any) -> agent_pb2.LookupResponse:
        self.owner.lookups += 1
        n = len(request.tokens)
        chunks = -(-n // self.owner.chunk_size)
        return agent_pb2.LookupResponse(matches=[agent_pb2.LocationMatch(location=request.location, num_tokens=n,
                                                                         num_chunks=chunks)])

    async def Compress(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.ProgressResponse]:
        async for msg in self.owner.script(request):
            yield msg

    Decompress = Compress

    async def Health(self, request: Any, context: Any) -> agent_pb2.HealthResponse:
        return agent_pb2.HealthResponse(error_code=0)


class ScriptedAgent:
    """``with ScriptedAgent(chunk_size) as a``: ``a.port`` serves; ``a.script`` drives the streams."""

    def __init__(self, chunk_size: int = 16) -> None:
        self.chunk_size = chunk_size
        self.lookups = 0
        self.release = threading.Event()
        self.script: Script = self._hold
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scripted-agent", daemon=True)
        self._server: grpc.aio.Server | None = None

    async def _hold(self, request: Any) -> AsyncIterator[agent_pb2.ProgressResponse]:
        """The default script: one chunk done, then the stream stays open until ``release`` is set."""
        yield chunk(0, self.chunk_size, len(request.tokens))
        while not self.release.is_set():
            await asyncio.sleep(0.02)
        n = len(request.tokens)
        yield final(min(n, self.chunk_size), 1, 1)

    def __enter__(self) -> ScriptedAgent:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        server = grpc.aio.server()
        agent_pb2_grpc.add_InstanceAgentServicer_to_server(_Servicer(self), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0.5), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
