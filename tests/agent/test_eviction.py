"""Eviction by whole prefixes, never the work in flight (issue 14.1), through real agents."""
from __future__ import annotations

import grpc
import pytest

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.errors import ResourceExhausted
from kvmesh.instance_agent.keys import chunk_spans
from kvmesh.instance_agent.storage import LocalCPUBackend, StoredChunk
from kvmesh.instance_agent.tensors import to_proto

from .conftest import CPU, make_config, make_kv, stub_for

# chunk_size 4, 3 layers, 16 channels, fp16: 2 * 3 * 4 * 16 * 2 bytes per chunk
CHUNK_BYTES = 2 * 3 * 4 * 16 * 2
GIB = 1 << 30


def cpu_config(chunks: float, **kw):
    return make_config(None, max_local_cpu_size=chunks * CHUNK_BYTES / GIB, **kw)


def seq(n_chunks: int, base: int) -> list[int]:
    return list(range(base, base + 4 * n_chunks))


def sequence_chunks(tokens: list[int], seed: int = 0) -> list[StoredChunk]:
    kv = make_kv(len(tokens), seed=seed)
    spans = chunk_spans(tokens, 4)
    return [StoredChunk(s.key, s.start, s.end, raw=kv[:, :, s.start:s.end], parent=spans[i - 1].key if i else "")
            for i, s in enumerate(spans)]


def prefix_len(backend, tokens: list[int]) -> int:
    n = 0
    for span in chunk_spans(tokens, 4):
        if not backend.contains(span.key):
            break
        n += 1
    return n


def stored_keys(backend, tokens: list[int]) -> list[bool]:
    return [backend.contains(s.key) for s in chunk_spans(tokens, 4)]


def test_a_sequence_is_evicted_from_its_tail_so_a_prefix_stays_usable() -> None:
    b = LocalCPUBackend(5 * CHUNK_BYTES)
    a = seq(4, 0)
    b.put_many(sequence_chunks(a))
    # A's first chunk is the least recently used; the old LRU would take it (and leave a useless tail).
    b.put_many(sequence_chunks(seq(3, 1000), seed=1))
    assert stored_keys(b, a) == [True, True, False, False], "A keeps a prefix: its tail went, not its head"
    assert b.evictions == 2 and b.used_bytes == 5 * CHUNK_BYTES


def test_a_put_that_cannot_fit_is_refused_whole_naming_the_numbers() -> None:
    b = LocalCPUBackend(3 * CHUNK_BYTES)
    a = seq(2, 0)
    b.put_many(sequence_chunks(a))
    b.set_pinned(chunk_spans(a, 4)[0].key, True)
    b.set_pinned(chunk_spans(a, 4)[1].key, True)
    big = seq(2, 500)
    with pytest.raises(ResourceExhausted) as info:
        b.put_many(sequence_chunks(big, seed=2))
    msg = info.value.message
    assert f"{2 * CHUNK_BYTES} bytes" in msg and f"{CHUNK_BYTES} bytes free" in msg and f"capacity of {3 * CHUNK_BYTES}" in msg
    assert "nothing was stored" in msg
    assert stored_keys(b, big) == [False, False], "no half-stored put"
    assert stored_keys(b, a) == [True, True] and b.evictions == 0


def test_a_put_never_evicts_its_own_chunks() -> None:
    """4 chunks into room for 3: the old code evicted the put's own first chunks; now it is refused."""
    b = LocalCPUBackend(3 * CHUNK_BYTES)
    tokens = seq(4, 0)
    with pytest.raises(ResourceExhausted, match="4 chunk"):
        b.put_many(sequence_chunks(tokens), protect=[s.key for s in chunk_spans(tokens, 4)])
    assert b.stats().num_chunks == 0 and b.evictions == 0


def test_chunks_of_a_running_operation_are_not_evicted() -> None:
    b = LocalCPUBackend(4 * CHUNK_BYTES)
    a = seq(2, 0)
    b.put_many(sequence_chunks(a))
    with b.protecting([s.key for s in chunk_spans(a, 4)]):
        with pytest.raises(ResourceExhausted, match="held by the operations in progress"):
            b.put_many(sequence_chunks(seq(3, 100), seed=3))
    assert stored_keys(b, a) == [True, True]
    # Once the operation is over its chunks are ordinary LRU tails again.
    b.put_many(sequence_chunks(seq(3, 100), seed=3))
    assert prefix_len(b, a) == 1


async def test_put_chunks_over_grpc_is_resource_exhausted_and_stores_nothing(agents) -> None:
    agent = await agents(cpu_config(3))
    channel, stub = stub_for(agent)
    try:
        tokens = seq(4, 0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutChunks(agent_pb2.PutChunksRequest(location=CPU, tokens=tokens, kv=to_proto(make_kv(16))))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in info.value.details() and "Traceback" not in info.value.details()
        assert await agent.lookup(tokens, CPU) == 0
    finally:
        await channel.close()


async def test_decompress_never_evicts_its_own_chunks(agents) -> None:
    """Compressed, the sequence fits with room to spare; decompressing it all does not fit. The
    chunks that cannot grow fail (their own count, with errors); none of the sequence is lost."""
    # int4 chunks are 472 bytes, raw ones 768: 5 int4 + 1 raw fit in 3200 bytes, 5 raw do not.
    agent = await agents(make_config(None, max_local_cpu_size=3200 / GIB))
    a, kv = seq(5, 0), make_kv(20)
    assert await agent.store(a[:12], kv[:, :, :12], CPU) == 12
    [m async for m in await agent.compress(a, "int4", CPU)]
    assert await agent.store(a, kv, CPU) == 8
    final = [m async for m in await agent.compress(a, "int4", CPU)][-1]
    assert final.chunks_done == 5 and final.chunks_failed == 0 and final.bytes_after == 5 * 472  # 3 skipped
    other = seq(1, 900)
    assert await agent.store(other, make_kv(4, seed=5), CPU) == 4
    msgs = [m async for m in await agent.decompress(a, "", CPU)]
    final = msgs[-1]
    assert final.final and final.chunks_total == 5
    assert final.chunks_done + final.chunks_failed == 5
    assert final.chunks_failed >= 1, "the whole sequence cannot be raw at once"
    assert len(final.errors) == final.chunks_failed and all("no room" in e for e in final.errors)
    # Chunks run concurrently, so which ones found no room depends on their order: count them, not places.
    assert sum(1 for m in msgs[:-1] if m.error) == final.chunks_failed
    assert await agent.lookup(a, CPU) == 20, "no chunk of the decompressed sequence was evicted"
    n, kv = await agent.retrieve(a, CPU)
    assert n == 20 and kv.shape[2] == 20
    # The other sequence paid for it, tail first.
    assert await agent.lookup(other, CPU) in (0, 4)


def test_a_put_protects_its_sequence_beyond_the_chunk_it_stores() -> None:
    """S lost its first chunk; putting S again must not evict S's own later chunks (tails too) to
    make room for it: another sequence pays."""
    b = LocalCPUBackend(5 * CHUNK_BYTES)
    s, t = seq(4, 0), seq(1, 300)
    b.put_many(sequence_chunks(s))
    b.put_many(sequence_chunks(t, seed=1))
    assert b.remove(chunk_spans(s, 4)[0].key)
    b.put_many(sequence_chunks(seq(1, 600), seed=2))  # full again
    keys = [x.key for x in chunk_spans(s, 4)]
    written = b.put_many(sequence_chunks(s), overwrite=False, protect=keys)
    assert written == [True, False, False, False]
    assert stored_keys(b, s) == [True, True, True, True]
    assert stored_keys(b, t) == [False], "the least recently used other sequence paid"
