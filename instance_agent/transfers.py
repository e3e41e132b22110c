"""Transfers between agents: Move (send the stored prefix to a peer) and ReceiveChunks (take them).

Chunks travel in their stored form, raw or encoded. A chunk leaves its location (for a move, not a
copy) only after the peer said it stored it.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from kvmesh.errors import Conflict, InvalidArgument, KVMeshError, from_grpc_error

from .chunk_ops import ChunkOperations, kv_shape_error
from .keys import ChunkSpan, chunk_ref_error
from .lifecycle import in_thread
from .methods import describe_missing
from .peer import PeerClient
from .results import ChunkProgress, OperationResult, Progress
from .storage import StorageBackend, StoredChunk

logger = logging.getLogger(__name__)


class Transfers(ChunkOperations):
    def _is_self(self, target_url: str) -> bool:
        host, _, port = target_url.rpartition(":")
        return port.isdigit() and int(port) in (self.grpc_port, self.p2p_port) and \
            host in (self.host, "localhost", "127.0.0.1", "[::1]", "::1", "0.0.0.0")

    async def move(self, tokens: Sequence[int], location: str, target_url: str, target_location: str = "",
                   copy: bool = False, event_id: str = "") -> AsyncIterator[Progress]:
        """Send the stored prefix of ``tokens`` to the agent at ``target_url`` in its stored form."""
        backend = self._required_location(location)
        if not target_url or ":" not in target_url:
            raise InvalidArgument(f"target_url must be host:port of the receiving agent, got {target_url!r}")
        target_location = target_location or backend.name
        if self._is_self(target_url) and target_location == backend.name:
            raise InvalidArgument(f"move from {backend.name} to itself on the same agent ({target_url}) would do nothing")
        spans = await self._prefix(backend, await self.aspans(tokens))
        return self._move_chunks(backend, spans, target_url, target_location, copy, event_id)

    async def _move_chunks(self, backend: StorageBackend, spans: list[ChunkSpan], target_url: str,
                           target_location: str, copy: bool, event_id: str) -> AsyncIterator[Progress]:
        done = moved_bytes = 0
        errors: list[str] = []
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(backend.protecting([span.key for span in spans]))
            peer = await stack.enter_async_context(PeerClient(target_url, self.config.security))
            peer_files = await self._peer_files(peer) if spans else None
            for span in spans:
                chunk_error = ""
                nbytes = 0
                async with self._locks.hold((backend.name, span.key)):
                    try:
                        chunk = await asyncio.to_thread(backend.get, span.key)
                        if chunk is None:
                            chunk_error = "the chunk was removed before it was sent"
                        elif peer_files is not None and self.codecs.missing_files(chunk.method, chunk.payload,
                                                                                  peer_files):
                            missing = self.codecs.missing_files(chunk.method, chunk.payload, peer_files)
                            chunk_error = f"chunk {span.key} was not sent: " + describe_missing(
                                missing, peer_files, f"the agent at {target_url}")
                        else:
                            nbytes = chunk.nbytes
                            await peer.send(target_location, [chunk])
                            if not copy:
                                await in_thread(None, backend.remove, span.key)
                    except grpc.RpcError as err:
                        chunk_error = f"sending to {target_url} failed: {from_grpc_error(err).message}"
                    except KVMeshError as err:
                        chunk_error = err.message
                if chunk_error:
                    errors.append(f"move {event_id} stopped at chunk {span.index} of {len(spans)}: {chunk_error}")
                    self.metrics.chunks.labels("move", "", backend.name, "failed").inc()
                else:
                    done += 1
                    moved_bytes += nbytes
                    self.metrics.chunks.labels("move", "", backend.name, "ok").inc()
                yield ChunkProgress(self.worker_id, span.index, span.key, span.start, span.end, bytes_before=nbytes,
                                    bytes_after=nbytes if not chunk_error else 0, error=chunk_error)
                if chunk_error:
                    # The peer is unreachable or refusing: the chunks after this one stay where they are.
                    break
        self._refresh_storage_metrics()
        yield OperationResult(num_tokens=spans[-1].end if spans else 0, chunks_total=len(spans), chunks_done=done,
                              chunks_failed=len(errors), bytes_before=moved_bytes, bytes_after=moved_bytes,
                              error=errors[0] if errors else "", errors=tuple(errors))

    @staticmethod
    async def _peer_files(peer: PeerClient) -> list[str] | None:
        """The model files the peer advertises; None when it cannot say (it checks on receipt)."""
        try:
            return (await peer.model_files())[1]
        except grpc.RpcError as err:
            logger.info("could not ask %s for its model files (%s); it checks them on receipt",
                        peer.target_url, err.code())
            return None

    def _check_received(self, i: int, chunk: StoredChunk) -> None:
        problem = chunk_ref_error(chunk.key, chunk.start, chunk.end)
        if problem:
            raise InvalidArgument(f"chunks[{i}]: {problem}")
        if chunk.encoded:
            if chunk.method not in self.codecs.available():
                raise InvalidArgument(f"chunks[{i}] is encoded with unknown method {chunk.method!r}; "
                                      f"available methods: {', '.join(self.codecs.available())}")
            missing = self.codecs.missing_files(chunk.method, chunk.payload)
            if missing:
                raise Conflict(f"chunks[{i}] (chunk {chunk.key}) refused: " + describe_missing(
                    missing, self.model_files(), "this agent"))
            return
        assert chunk.raw is not None
        problem = kv_shape_error(chunk.raw, chunk.end - chunk.start)
        if problem:
            raise InvalidArgument(f"chunks[{i}]: {problem}")

    async def receive_chunks(self, location: str, chunks: Sequence[StoredChunk]) -> int:
        """Store chunks a peer sent in their stored form; returns how many were stored."""
        backend = self.location(location)
        for i, chunk in enumerate(chunks):
            self._check_received(i, chunk)
        keys = [chunk.key for chunk in chunks]
        try:
            async with contextlib.AsyncExitStack() as stack:
                for _, key in sorted({(c.start, c.key) for c in chunks}):  # the order put_chunks takes them in
                    await stack.enter_async_context(self._locks.hold((backend.name, key)))
                # All of them or none, as a put: a move never leaves half a sequence on the peer.
                written = await in_thread(None, functools.partial(backend.put_many, list(chunks), protect=keys))
        finally:
            self._refresh_storage_metrics()
        return sum(written)
