"""Conversions between the agent's plain results and ``agent.proto`` messages.

The servicer (``service``) and the peer client (``peer``) use these; domain code never builds a
message. Tensor conversions copy the whole payload: callers run them off the event loop.
"""
from __future__ import annotations

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.api.common.v1 import common_pb2
from kvmesh.errors import InvalidArgument

from .keys import chunk_ref_error
from .results import AgentStats, ChunkProgress, HealthReport, LocationReport, OperationResult, Progress
from .storage import RAW, StoredChunk
from .tensors import from_proto, to_proto


def progress_to_proto(item: Progress) -> agent_pb2.ProgressResponse:
    if isinstance(item, ChunkProgress):
        return agent_pb2.ProgressResponse(progress=common_pb2.ChunkProgress(
            worker_id=item.worker_id, chunk_index=item.chunk_index, chunk_key=item.chunk_key,
            token_start=item.token_start, token_end=item.token_end, bytes_before=item.bytes_before,
            bytes_after=item.bytes_after, codec_seconds=item.codec_seconds, skipped=item.skipped,
            error=item.error))
    assert isinstance(item, OperationResult)
    return agent_pb2.ProgressResponse(final=True, num_tokens=item.num_tokens, chunks_total=item.chunks_total,
                                      chunks_done=item.chunks_done, chunks_failed=item.chunks_failed,
                                      bytes_before=item.bytes_before, bytes_after=item.bytes_after,
                                      error=item.error, errors=list(item.errors))


def location_to_proto(r: LocationReport) -> agent_pb2.LocationStats:
    return agent_pb2.LocationStats(name=r.name, used_bytes=r.used_bytes, capacity_bytes=r.capacity_bytes,
                                   num_chunks=r.num_chunks, num_encoded=r.num_encoded, num_pinned=r.num_pinned,
                                   free_bytes=r.free_bytes, available=r.available, problem=r.problem)


def stats_to_proto(s: AgentStats) -> agent_pb2.StatsResponse:
    return agent_pb2.StatsResponse(instance_id=s.instance_id, worker_id=s.worker_id, chunk_size=s.chunk_size,
                                   methods=s.methods, locations=[location_to_proto(r) for r in s.locations],
                                   model_files=s.model_files)


def health_to_proto(h: HealthReport) -> agent_pb2.HealthResponse:
    return agent_pb2.HealthResponse(error_code=h.error_code, message=h.message,
                                    locations=[location_to_proto(r) for r in h.locations],
                                    model_files=h.model_files)


def chunk_to_proto(chunk: StoredChunk) -> agent_pb2.StoredChunk:
    """A stored chunk as sent to a peer, in its stored form (copies the tensor: off the loop)."""
    msg = agent_pb2.StoredChunk(chunk_key=chunk.key, token_start=chunk.start, token_end=chunk.end,
                                method=chunk.method, parent_key=chunk.parent)
    if chunk.encoded:
        msg.payload = chunk.payload or b""
    elif chunk.raw is not None:
        msg.raw.CopyFrom(to_proto(chunk.raw))
    return msg


def chunk_from_proto(msg: agent_pb2.StoredChunk, i: int) -> StoredChunk:
    """The chunk a peer sent (``i`` its index, for messages); InvalidArgument when malformed."""
    problem = chunk_ref_error(msg.chunk_key, msg.token_start, msg.token_end)
    if problem:
        raise InvalidArgument(f"chunks[{i}]: {problem}")
    if msg.method:
        return StoredChunk(msg.chunk_key, msg.token_start, msg.token_end, msg.method, payload=msg.payload,
                           parent=msg.parent_key)
    if not msg.HasField("raw"):
        raise InvalidArgument(f"chunks[{i}] has neither a method nor a raw tensor")
    return StoredChunk(msg.chunk_key, msg.token_start, msg.token_end, RAW, raw=from_proto(msg.raw),
                       parent=msg.parent_key)
