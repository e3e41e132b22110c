"""The InstanceAgent gRPC service over real loopback servers: every RPC, happy paths and bad inputs."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.api.common.v1 import common_pb2
from kvmesh.codecs import available_methods, get_codec
from kvmesh.instance_agent.keys import chunk_spans
from kvmesh.instance_agent.tensors import from_proto, to_proto

from .conftest import CPU, DISK, make_config, make_kv, stub_for

TOKENS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]  # the seed's prompt
LOSSY = [m for m in ("cachegen", "int8") if m in available_methods()]


async def put(stub, tokens, kv, location=CPU):
    return await stub.PutChunks(agent_pb2.PutChunksRequest(location=location, tokens=tokens, kv=to_proto(kv)))


async def get(stub, tokens, location=""):
    resp = await stub.GetChunks(agent_pb2.GetChunksRequest(location=location, tokens=tokens))
    return resp.num_tokens, (from_proto(resp.kv) if resp.HasField("kv") else None)


async def collect(call) -> list[agent_pb2.ProgressResponse]:
    return [msg async for msg in call]


async def expect_error(coro_or_call, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = coro_or_call
        if hasattr(result, "__aiter__"):
            await collect(result)
        else:
            await result
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
async def test_put_get_round_trip_is_exact(stub, dtype: torch.dtype) -> None:
    kv = make_kv(len(TOKENS), dtype=dtype)
    resp = await put(stub, TOKENS, kv)
    assert (resp.num_tokens, resp.chunks_stored) == (12, 3)
    n, got = await get(stub, TOKENS)
    assert n == 12 and got.dtype == dtype and torch.equal(got, kv)
    # A longer sequence sharing the prefix: the stored prefix is found; a different one is not.
    n, got = await get(stub, TOKENS + [7, 7, 7])
    assert n == 12 and torch.equal(got, kv)
    n, got = await get(stub, [1] + TOKENS[1:])
    assert (n, got) == (0, None)
    again = await put(stub, TOKENS, kv)
    assert (again.num_tokens, again.chunks_stored) == (12, 0), "stored chunks are kept, not rewritten"


# Each method once, each location with a lossless and a lossy method (cachegen on CPU is slow).
CASES = [(CPU, "lossless"), (DISK, "lossless")] + [(loc, m) for loc, m in zip((DISK, CPU), LOSSY)]


@pytest.mark.parametrize(("location", "method"), CASES)
async def test_compress_reports_each_chunk_then_reads_decode(agent, stub, method: str, location: str) -> None:
    tokens = list(range(1000, 1018))  # 4 full chunks and a partial one
    kv = make_kv(len(tokens), seed=3)
    await put(stub, tokens, kv, location)
    msgs = await collect(stub.Compress(agent_pb2.CompressRequest(event_id="e1", method=method,
                                                                 location=location, tokens=tokens)))
    spans = chunk_spans(tokens, 4)
    progress, final = msgs[:-1], msgs[-1]
    # Each chunk reported once, as it finishes (chunks may finish out of order).
    progress.sort(key=lambda m: m.progress.chunk_index)
    assert [m.progress.chunk_index for m in progress] == [s.index for s in spans]
    assert [m.progress.chunk_key for m in progress] == [s.key for s in spans]
    assert all(not m.final and not m.progress.error and not m.progress.skipped for m in progress)
    assert all(m.progress.bytes_after > 0 and m.progress.codec_seconds > 0 for m in progress)
    assert [m.progress.bytes_before for m in progress] == [kv[:, :, s.start:s.end].numel() * 2 for s in spans]
    assert final.final and final.error == ""
    assert (final.num_tokens, final.chunks_total, final.chunks_done) == (18, 5, 5)
    assert final.bytes_before == sum(m.progress.bytes_before for m in progress)
    assert final.bytes_after == sum(m.progress.bytes_after for m in progress)

    n, got = await get(stub, tokens, location)
    assert n == 18
    for s in spans:
        codec = agent.codecs.get(method, s.start)  # the agent's writer for the chunk (Triton on a GPU host)
        chunk = kv[:, :, s.start:s.end].contiguous()
        expected = codec.decode(codec.encode(chunk)).cpu()
        assert torch.equal(got[:, :, s.start:s.end], expected), f"chunk {s.index}"

    stats = await stub.Stats(agent_pb2.StatsRequest())
    loc = next(x for x in stats.locations if x.name == location)
    assert (loc.num_chunks, loc.num_encoded) == (5, 5)
    assert loc.used_bytes == final.bytes_after

    # Compressing again: every chunk is already in that form.
    again = await collect(stub.Compress(agent_pb2.CompressRequest(method=method, location=location, tokens=tokens)))
    assert all(m.progress.skipped for m in again[:-1]) and again[-1].chunks_done == 5

    # Decompress restores raw chunks holding the codec's reconstruction.
    msgs = await collect(stub.Decompress(agent_pb2.DecompressRequest(method=method, location=location, tokens=tokens)))
    assert msgs[-1].final and msgs[-1].error == "" and msgs[-1].chunks_done == 5
    restored = sorted(msgs[:-1], key=lambda m: m.progress.chunk_index)
    assert [m.progress.bytes_after for m in restored] == [m.progress.bytes_before for m in progress]
    stats = await stub.Stats(agent_pb2.StatsRequest())
    assert next(x for x in stats.locations if x.name == location).num_encoded == 0
    n, raw_again = await get(stub, tokens, location)
    assert n == 18 and torch.equal(raw_again, got)


@pytest.mark.parametrize("method", LOSSY)
async def test_lossy_methods_shrink_realistic_chunks(agents, method: str) -> None:
    # Tiny chunks cannot shrink (a container's tables outweigh them); a 256-token chunk must.
    agent = await agents(make_config(chunk_size=256, max_local_cpu_size=0.1))
    channel, stub = stub_for(agent)
    async with channel:
        tokens = list(range(300))
        await put(stub, tokens, make_kv(300, layers=2, channels=64, seed=4))
        msgs = await collect(stub.Compress(agent_pb2.CompressRequest(method=method, location=CPU, tokens=tokens)))
        final = msgs[-1]
        assert final.error == "" and final.chunks_done == 2
        assert msgs[0].progress.bytes_after < msgs[0].progress.bytes_before
        assert final.bytes_after < final.bytes_before


async def test_seed_prompt_counts_the_partial_chunk(agents) -> None:
    agent = await agents(make_config(chunk_size=256))
    channel, stub = stub_for(agent)
    async with channel:
        await put(stub, TOKENS, make_kv(12))
        msgs = await collect(stub.Compress(agent_pb2.CompressRequest(method="lossless", location=CPU, tokens=TOKENS)))
        assert msgs[-1].num_tokens == 12 and msgs[-1].chunks_total == 1
        look = await stub.Lookup(agent_pb2.LookupRequest(tokens=TOKENS))
        assert {(m.location, m.num_tokens, m.num_chunks) for m in look.matches} == {(CPU, 12, 1)}


class FlakyCodec:
    """The real lossless codec, except that its Nth encode raises: an injected fault (test only)."""

    def __init__(self, fail_on: int) -> None:
        self.inner = get_codec("lossless", backend="cpu")
        self.fail_on = fail_on
        self.calls = 0

    def encode(self, kv: torch.Tensor) -> bytes:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("injected fault: encoder crashed")
        return self.inner.encode(kv)

    def decode(self, blob: bytes) -> torch.Tensor:
        return self.inner.decode(blob)


class WrongShapeCodec:
    """Writes a container that decodes to the wrong shape (a broken codec, test only)."""

    def encode(self, kv: torch.Tensor) -> bytes:
        return get_codec("lossless", backend="cpu").encode(kv[:, :, :1].contiguous())

    def decode(self, blob: bytes) -> torch.Tensor:
        return get_codec("lossless", backend="cpu").decode(blob)


@pytest.mark.parametrize("location", [CPU, DISK])
async def test_failure_mid_compress_loses_nothing(agents, tmp_path: Path, location: str) -> None:
    agent = await agents(make_config(tmp_path), extra_codecs={"flaky": FlakyCodec(fail_on=2),
                                                             "wrongshape": WrongShapeCodec()})
    channel, stub = stub_for(agent)
    async with channel:
        tokens = list(range(12))
        kv = make_kv(12, seed=5)
        await put(stub, tokens, kv, location)
        msgs = await collect(stub.Compress(agent_pb2.CompressRequest(method="flaky", location=location, tokens=tokens)))
        failed = [m.progress.chunk_index for m in msgs[:-1] if m.progress.error]
        assert len(failed) == 1 and len(msgs) == 4
        assert "injected fault" in next(m.progress.error for m in msgs[:-1] if m.progress.error)
        final = msgs[-1]
        assert final.chunks_done == 2 and "1 of 3 chunks failed" in final.error
        assert f"chunk {failed[0]}: RuntimeError: injected fault" in final.error
        n, got = await get(stub, tokens, location)
        assert n == 12 and torch.equal(got, kv), "every chunk readable and unchanged"
        stats = await stub.Stats(agent_pb2.StatsRequest())
        assert next(x for x in stats.locations if x.name == location).num_encoded == 2

        msgs = await collect(stub.Compress(agent_pb2.CompressRequest(method="wrongshape", location=location,
                                                                     tokens=tokens)))
        assert all("decodes to" in m.progress.error for m in msgs[:-1])
        assert msgs[-1].chunks_done == 0
        n, got = await get(stub, tokens, location)
        assert n == 12 and torch.equal(got, kv)


async def test_decompress_with_another_method_is_that_chunks_error(stub) -> None:
    tokens = list(range(8))
    kv = make_kv(8)
    await put(stub, tokens, kv)
    await collect(stub.Compress(agent_pb2.CompressRequest(method="lossless", location=CPU, tokens=tokens[:4])))
    await collect(stub.Compress(agent_pb2.CompressRequest(method="int8", location=CPU, tokens=tokens)))
    msgs = await collect(stub.Decompress(agent_pb2.DecompressRequest(method="lossless", location=CPU, tokens=tokens)))
    by_index = {m.progress.chunk_index: m.progress for m in msgs[:-1]}
    assert "encoded with 'int8', not 'lossless'" in by_index[1].error
    assert msgs[-1].error
    # Empty method: whatever each chunk holds.
    msgs = await collect(stub.Decompress(agent_pb2.DecompressRequest(location=CPU, tokens=tokens)))
    assert msgs[-1].error == "" and msgs[-1].chunks_done == 2
    stats = await stub.Stats(agent_pb2.StatsRequest())
    assert stats.locations[0].num_encoded == 0


async def test_concurrent_operations_on_overlapping_tokens(stub) -> None:
    tokens = list(range(500, 540))  # 10 chunks
    kv = make_kv(40, seed=9)
    await put(stub, tokens, kv)

    async def op(i: int) -> list[agent_pb2.ProgressResponse]:
        toks = tokens[: 8 + 4 * (i % 8)]
        if i % 2:
            return await collect(stub.Compress(agent_pb2.CompressRequest(method="lossless", location=CPU, tokens=toks)))
        return await collect(stub.Decompress(agent_pb2.DecompressRequest(location=CPU, tokens=toks)))

    async def reader() -> None:
        for _ in range(5):
            n, got = await get(stub, tokens)
            assert n == 40 and torch.equal(got, kv)

    results = await asyncio.gather(*(op(i) for i in range(16)), reader(), reader())
    for msgs in results[:16]:
        assert msgs[-1].final and msgs[-1].error == "", msgs[-1].error
        assert msgs[-1].chunks_done == msgs[-1].chunks_total
    n, got = await get(stub, tokens)
    assert n == 40 and torch.equal(got, kv)


async def test_move_and_copy_between_two_agents(agents, tmp_path: Path) -> None:
    a = await agents(make_config(tmp_path / "a"))
    b = await agents(make_config(tmp_path / "b"))
    ca, sa = stub_for(a)
    cb, sb = stub_for(b)
    async with ca, cb:
        tokens = list(range(10))
        kv = make_kv(10, seed=11)
        await put(sa, tokens, kv)
        await collect(sa.Compress(agent_pb2.CompressRequest(method="int8", location=CPU, tokens=tokens[:4])))
        _, expected = await get(sa, tokens)

        msgs = await collect(sa.Move(agent_pb2.MoveRequest(event_id="m1", location=CPU, tokens=tokens,
                                                           target_url=f"localhost:{b.grpc_port}",
                                                           target_location=DISK, copy=True)))
        assert msgs[-1].error == "" and msgs[-1].chunks_done == 3 and len(msgs) == 4
        n, got = await get(sb, tokens, DISK)
        assert n == 10 and torch.equal(got, expected)
        stats_b = await sb.Stats(agent_pb2.StatsRequest())
        disk_b = next(x for x in stats_b.locations if x.name == DISK)
        assert (disk_b.num_chunks, disk_b.num_encoded) == (3, 1), "chunks travel in their stored form"
        assert (await get(sa, tokens))[0] == 10, "copy keeps the source"

        msgs = await collect(sa.Move(agent_pb2.MoveRequest(location=CPU, tokens=tokens,
                                                           target_url=f"localhost:{b.grpc_port}")))
        assert msgs[-1].error == "" and msgs[-1].chunks_done == 3
        assert (await get(sa, tokens))[0] == 0, "a move removes the source"
        n, got = await get(sb, tokens, CPU)
        assert n == 10 and torch.equal(got, expected)

        # Within one agent, from memory to disk.
        msgs = await collect(sb.Move(agent_pb2.MoveRequest(location=CPU, tokens=tokens, target_location=DISK,
                                                           target_url=f"localhost:{b.grpc_port}")))
        assert msgs[-1].error == ""
        look = await sb.Lookup(agent_pb2.LookupRequest(tokens=tokens))
        assert {m.location: m.num_tokens for m in look.matches} == {CPU: 0, DISK: 10}


async def test_move_to_an_unreachable_peer_keeps_the_chunks(stub, agent) -> None:
    from tests.support import free_port

    tokens = list(range(8))
    kv = make_kv(8)
    await put(stub, tokens, kv)
    msgs = await collect(stub.Move(agent_pb2.MoveRequest(location=CPU, tokens=tokens,
                                                         target_url=f"127.0.0.1:{free_port()}")))
    assert "stopped at chunk 0" in msgs[-1].error and msgs[-1].chunks_done == 0
    n, got = await get(stub, tokens)
    assert n == 8 and torch.equal(got, kv)


async def test_clear_pin_unpin_lookup(agents, tmp_path: Path) -> None:
    # Room for three chunks of memory: pinning decides what survives new puts.
    agent = await agents(make_config(tmp_path, max_local_cpu_size=3 * 768 / (1 << 30)))
    channel, stub = stub_for(agent)
    async with channel:
        first, second = list(range(8)), list(range(100, 108))
        await put(stub, first, make_kv(8))
        pin = await stub.Pin(agent_pb2.PinRequest(location=CPU, tokens=first))
        assert pin.num_tokens == 8
        # Two chunks into room for one (the rest is pinned): refused whole, never half-stored.
        await expect_error(put(stub, second, make_kv(8, seed=1)), grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "768 bytes free", "capacity of 2304", "nothing was stored")
        look = await stub.Lookup(agent_pb2.LookupRequest(tokens=first, location=CPU))
        assert [(m.location, m.num_tokens, m.num_chunks) for m in look.matches] == [(CPU, 8, 2)]
        look = await stub.Lookup(agent_pb2.LookupRequest(tokens=second, location=CPU))
        assert look.matches[0].num_tokens == 0
        stats = await stub.Stats(agent_pb2.StatsRequest())
        assert stats.locations[0].num_pinned == 2
        unpin = await stub.Unpin(agent_pb2.UnpinRequest(location=CPU, tokens=first))
        assert unpin.num_tokens == 8
        await put(stub, second, make_kv(8, seed=1))
        # `first` gave up its tail to make room: its first chunk is still a usable prefix.
        look = await stub.Lookup(agent_pb2.LookupRequest(tokens=first))
        assert {m.location: m.num_tokens for m in look.matches} == {CPU: 4, DISK: 0}

        await put(stub, first, make_kv(8), DISK)
        cleared = await stub.Clear(agent_pb2.ClearRequest(location=DISK, tokens=first[:4]))
        assert (cleared.num_tokens, cleared.num_chunks) == (4, 1)
        look = await stub.Lookup(agent_pb2.LookupRequest(tokens=first, location=DISK))
        assert look.matches[0].num_tokens == 0
        cleared = await stub.Clear(agent_pb2.ClearRequest())
        assert cleared.num_chunks >= 2
        stats = await stub.Stats(agent_pb2.StatsRequest())
        assert all(x.num_chunks == 0 and x.used_bytes == 0 for x in stats.locations)


async def test_health_and_stats(stub, agent) -> None:
    health = await stub.Health(agent_pb2.HealthRequest())
    assert (health.error_code, health.message) == (0, "ok")
    stats = await stub.Stats(agent_pb2.StatsRequest())
    assert stats.instance_id == "test_instance" and stats.worker_id == 0 and stats.chunk_size == 4
    assert "lossless" in stats.methods
    assert [x.name for x in stats.locations] == [CPU, DISK]
    assert stats.locations[0].capacity_bytes == agent.config.max_local_cpu_bytes
    # A location whose accounting is off fails the memory check (-1), with the reason.
    agent.locations[CPU]._used += 1
    health = await stub.Health(agent_pb2.HealthRequest())
    assert health.error_code == -1 and "LocalCPUBackend" in health.message
    agent.locations[CPU]._used -= 1
    assert (await stub.Health(agent_pb2.HealthRequest())).error_code == 0


async def test_health_reports_a_failing_check_as_worker_error(agent, stub, monkeypatch) -> None:
    def broken() -> list[str]:  # injected fault: the storage check itself crashes
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(agent, "_check_storage", broken)
    health = await stub.Health(agent_pb2.HealthRequest())
    assert health.error_code == -1001 and "Input/output error" in health.message


async def test_bad_inputs_are_invalid_argument_saying_what(stub) -> None:
    ok_kv = to_proto(make_kv(4))
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(stub.GetChunks(agent_pb2.GetChunksRequest(tokens=[1, -5])), INVALID, "tokens[1]", "-5")
    await expect_error(stub.Lookup(agent_pb2.LookupRequest(tokens=[1], location="GPUBackend")), INVALID,
                       "unknown location 'GPUBackend'", CPU, DISK)
    await expect_error(stub.Compress(agent_pb2.CompressRequest(method="zip", location=CPU, tokens=[1])), INVALID,
                       "unknown method 'zip'", "lossless")
    await expect_error(stub.Compress(agent_pb2.CompressRequest(method="", location=CPU, tokens=[1])), INVALID,
                       "method is required")
    await expect_error(stub.Compress(agent_pb2.CompressRequest(method="lossless", location="", tokens=[1])),
                       INVALID, "location is required", CPU)
    await expect_error(stub.Decompress(agent_pb2.DecompressRequest(method="zip", location=CPU, tokens=[1])),
                       INVALID, "zip")
    await expect_error(stub.PutChunks(agent_pb2.PutChunksRequest(location=CPU, tokens=[1, 2, 3, 4])), INVALID,
                       "kv is required")
    await expect_error(stub.PutChunks(agent_pb2.PutChunksRequest(location=CPU, tokens=[1, 2, 3], kv=ok_kv)),
                       INVALID, "holds 4 tokens", "3 tokens")
    bad_dtype = common_pb2.Tensor(dtype="complex64", shape=[2, 1, 1, 1], data=b"\0" * 8)
    await expect_error(stub.PutChunks(agent_pb2.PutChunksRequest(tokens=[1], kv=bad_dtype)), INVALID,
                       "unknown dtype 'complex64'")
    short = common_pb2.Tensor(dtype="float16", shape=[2, 1, 4, 4], data=b"\0" * 10)
    await expect_error(stub.PutChunks(agent_pb2.PutChunksRequest(tokens=[1, 2, 3, 4], kv=short)), INVALID,
                       "needs 64 bytes, got 10")
    flat = to_proto(torch.zeros(4, 4, dtype=torch.float16))
    await expect_error(stub.PutChunks(agent_pb2.PutChunksRequest(tokens=[1, 2, 3, 4], kv=flat)), INVALID,
                       "[2, layers, tokens, channels]")
    await expect_error(stub.Move(agent_pb2.MoveRequest(location=CPU, tokens=[1], target_url="nowhere")), INVALID,
                       "target_url")
    await expect_error(stub.ReceiveChunks(agent_pb2.ReceiveChunksRequest(
        location=CPU, chunks=[agent_pb2.StoredChunk(chunk_key="zz", token_start=0, token_end=4)])), INVALID,
        "chunk_key 'zz'")
    key = chunk_spans([1, 2, 3, 4], 4)[0].key
    await expect_error(stub.ReceiveChunks(agent_pb2.ReceiveChunksRequest(
        location=CPU, chunks=[agent_pb2.StoredChunk(chunk_key=key, token_start=0, token_end=4, method="zip",
                                                    payload=b"x")])), INVALID, "unknown method 'zip'")


async def test_tokens_over_the_limit_are_refused(agents, tmp_path: Path) -> None:
    agent = await agents(make_config(tmp_path, extra_config={"max_tokens": 16}))
    channel, stub = stub_for(agent)
    async with channel:
        await expect_error(stub.Lookup(agent_pb2.LookupRequest(tokens=list(range(17)))),
                           grpc.StatusCode.INVALID_ARGUMENT, "17 tokens is over the limit of 16")


async def test_standard_health_and_reflection(agent) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"localhost:{agent.grpc_port}") as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kvmesh.api.agent.v1.InstanceAgent"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        names = []
        async for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            names = [s.name for s in r.list_services_response.service]
        assert "kvmesh.api.agent.v1.InstanceAgent" in names and "grpc.health.v1.Health" in names


async def test_corrupt_disk_chunk_is_never_served(agent, stub) -> None:
    tokens = list(range(12))
    kv = make_kv(12, seed=21)
    await put(stub, tokens, kv, DISK)
    disk = agent.locations[DISK]
    path = disk.path_of(chunk_spans(tokens, 4)[1].key)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55  # same length: only the checksum can tell
    path.write_bytes(bytes(data))
    n, got = await get(stub, tokens, DISK)
    assert n == 4 and torch.equal(got, kv[:, :, :4]), "the prefix ends before the corrupt chunk"
    assert disk.corrupt_files and not disk.contains(chunk_spans(tokens, 4)[1].key)
    look = await stub.Lookup(agent_pb2.LookupRequest(tokens=tokens, location=DISK))
    assert look.matches[0].num_tokens == 4


async def test_peer_port_serves_the_same_service(agents, tmp_path: Path) -> None:
    agent = await agents(make_config(tmp_path, enable_p2p=True, p2p_init_ports=[0]))
    assert agent.p2p_port and agent.p2p_port != agent.grpc_port
    async with grpc.aio.insecure_channel(f"localhost:{agent.p2p_port}") as channel:
        from kvmesh.api.agent.v1 import agent_pb2_grpc

        health = await agent_pb2_grpc.InstanceAgentStub(channel).Health(agent_pb2.HealthRequest())
        assert health.error_code == 0


async def test_move_onto_itself_is_refused(agent, stub) -> None:
    await put(stub, [1, 2, 3, 4], make_kv(4))
    await expect_error(stub.Move(agent_pb2.MoveRequest(location=CPU, tokens=[1, 2, 3, 4],
                                                       target_url=f"localhost:{agent.grpc_port}")),
                       grpc.StatusCode.INVALID_ARGUMENT, "to itself")
    assert (await get(stub, [1, 2, 3, 4]))[0] == 4
