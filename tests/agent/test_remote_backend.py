"""The remote tier on a real redis-server (issue 14.5): shared chunks, compress/decompress in place,
TTL and pins, an outage answered clearly while the local tiers serve, configuration errors."""
from __future__ import annotations

import grpc
import pytest
import torch

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.codecs import get_codec
from kvmesh.instance_agent.agent import InstanceAgent
from kvmesh.instance_agent.config import ConfigError
from kvmesh.instance_agent.tensors import from_proto, to_proto

from .conftest import CPU, make_config, make_kv, stub_for

REMOTE = "RemoteBackend"
TOKENS = list(range(16))  # 4 chunks of 4


def remote_config(tmp_path, server, name: str = "a", **extra):
    return make_config(tmp_path / name, remote_url=server.url, lmcache_instance_id=f"inst_{name}",
                       extra_config={"remote_key_prefix": "test:", **extra})


def redis_key(server, tokens, index: int, worker: int = 0) -> bytes:
    from kvmesh.instance_agent.keys import chunk_spans

    return f"test:w{worker}:{chunk_spans(tokens, 4)[index].key}".encode()


async def test_chunks_stored_by_one_agent_are_found_and_read_by_another(agents, tmp_path, redis_srv) -> None:
    a = await agents(remote_config(tmp_path, redis_srv, "a"))
    b = await agents(remote_config(tmp_path, redis_srv, "b"))
    kv = make_kv(16)
    assert await a.store(TOKENS, kv, REMOTE) == 16
    assert await a.store(TOKENS, kv, REMOTE) == 0, "stored once by key"
    assert redis_srv.client.exists(redis_key(redis_srv, TOKENS, 0))
    channel, stub = stub_for(b)
    async with channel:
        look = await stub.Lookup(agent_pb2.LookupRequest(tokens=TOKENS))
        assert {m.location: m.num_tokens for m in look.matches} == {CPU: 0, "LocalDiskBackend": 0, REMOTE: 16}
        # The engine's read (no location): a local miss falls back to the remote store.
        got = await stub.GetChunks(agent_pb2.GetChunksRequest(tokens=TOKENS))
        assert got.num_tokens == 16 and torch.equal(from_proto(got.kv), kv)
        stats = await stub.Stats(agent_pb2.StatsRequest())
        remote = next(x for x in stats.locations if x.name == REMOTE)
        assert remote.num_chunks == 4 and remote.used_bytes == kv.numel() * 2 and remote.available


async def test_engine_stores_write_through_once(agents, tmp_path, redis_srv) -> None:
    a = await agents(remote_config(tmp_path, redis_srv, "a"))
    b = await agents(remote_config(tmp_path, redis_srv, "b"))
    kv = make_kv(16, seed=3)
    assert await a.store(TOKENS, kv) == 16  # the default location, as an engine stores
    assert await a.lookup(TOKENS, CPU) == 16 and await a.lookup(TOKENS, REMOTE) == 16
    n, got = await b.retrieve(TOKENS)
    assert n == 16 and torch.equal(got, kv)


async def test_compress_and_decompress_in_place_on_the_remote_store(agents, tmp_path, redis_srv) -> None:
    a = await agents(remote_config(tmp_path, redis_srv, "a"))
    b = await agents(remote_config(tmp_path, redis_srv, "b"))
    kv = make_kv(16, seed=1)
    await a.store(TOKENS, kv, REMOTE)
    final = [m async for m in await a.compress(TOKENS, "cachegen", REMOTE)][-1]
    assert final.chunks_done == 4 and final.chunks_failed == 0 and final.bytes_after < final.bytes_before
    assert redis_srv.client.hget(redis_key(redis_srv, TOKENS, 2), "m") == b"cachegen"
    # The other agent sees the encoded form and reads it decoded.
    msgs = [m async for m in await b.compress(TOKENS, "cachegen", REMOTE)]
    assert msgs[-1].chunks_done == 4 and all(m.skipped for m in msgs[:-1]), "already encoded: skipped"
    n, got = await b.retrieve(TOKENS, REMOTE)
    codec = get_codec("cachegen", backend="cpu")  # each chunk as the agent writes it: later chunks have no lead row
    want = torch.cat([codec.decode(codec.for_chunk(i).encode(kv[:, :, i:i + 4].contiguous())) for i in range(0, 16, 4)],
                     dim=2)
    assert n == 16 and torch.equal(got, want)
    final = [m async for m in await b.decompress(TOKENS, "", REMOTE)][-1]
    assert final.chunks_done == 4 and final.chunks_failed == 0
    assert redis_srv.client.hget(redis_key(redis_srv, TOKENS, 2), "m") == b""
    n, back = await a.retrieve(TOKENS, REMOTE)
    assert n == 16 and torch.equal(back, got)


async def test_remote_serde_names_the_codec_chunks_are_written_with(agents, tmp_path, redis_srv) -> None:
    cfg = remote_config(tmp_path, redis_srv, "a")
    cfg.remote_serde = "cachegen"
    agent = await agents(cfg)
    await agent.store(TOKENS, make_kv(16, seed=2), REMOTE)
    assert redis_srv.client.hget(redis_key(redis_srv, TOKENS, 0), "m") == b"cachegen"


async def test_ttl_is_respected_and_pins_hold(agents, tmp_path, redis_srv) -> None:
    agent = await agents(remote_config(tmp_path, redis_srv, "a", remote_ttl_seconds=2))
    await agent.store(TOKENS, make_kv(16), REMOTE)
    k0, k3 = redis_key(redis_srv, TOKENS, 0), redis_key(redis_srv, TOKENS, 3)
    assert 0 < redis_srv.client.ttl(k0) <= 2
    assert await agent.set_pinned(REMOTE, TOKENS[:4], True) == 4
    assert redis_srv.client.ttl(k0) == -1, "a pinned chunk does not expire"
    # Redis expires the others on its own clock; poll the agent's view of them.
    import asyncio

    for _ in range(200):
        if await agent.lookup(TOKENS, REMOTE) == 4:
            break
        await asyncio.sleep(0.05)
    assert await agent.lookup(TOKENS, REMOTE) == 4 and not redis_srv.client.exists(k3)
    assert await agent.set_pinned(REMOTE, TOKENS[:4], False) == 4
    assert 0 < redis_srv.client.ttl(k0) <= 2


async def test_an_outage_is_unavailable_and_the_local_tiers_keep_serving(agents, tmp_path, redis_srv) -> None:
    agent = await agents(remote_config(tmp_path, redis_srv, "a", remote_timeout_seconds=1.0))
    local = list(range(500, 508))
    kv = make_kv(8, seed=4)
    channel, stub = stub_for(agent)
    async with channel:
        await stub.PutChunks(agent_pb2.PutChunksRequest(tokens=local, kv=to_proto(kv)))
        redis_srv.kill()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Lookup(agent_pb2.LookupRequest(tokens=local, location=REMOTE))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert redis_srv.url in info.value.details() and "local locations keep serving" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutChunks(agent_pb2.PutChunksRequest(tokens=TOKENS, kv=to_proto(make_kv(16)), location=REMOTE))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The engine's path: local hits served, new stores kept locally (write-through logged).
        got = await stub.GetChunks(agent_pb2.GetChunksRequest(tokens=local))
        assert got.num_tokens == 8 and torch.equal(from_proto(got.kv), kv)
        put = await stub.PutChunks(agent_pb2.PutChunksRequest(tokens=TOKENS, kv=to_proto(make_kv(16))))
        assert put.num_tokens == 16
        look = await stub.Lookup(agent_pb2.LookupRequest(tokens=local))
        assert {m.location: m.num_tokens for m in look.matches}[CPU] == 8
        health = await stub.Health(agent_pb2.HealthRequest())
        assert health.error_code == -1 and REMOTE in health.message and "PING" in health.message
        remote = next(x for x in health.locations if x.name == REMOTE)
        assert not remote.available and remote.free_bytes == -1
        local_cpu = next(x for x in health.locations if x.name == CPU)
        assert local_cpu.available


@pytest.mark.parametrize("overrides,fragment", [
    ({"remote_url": "mooncakestore://10.0.0.1:50051"}, "remote_url"),
    ({"extra_config": {"remote_ttl_seconds": -3}}, "remote_ttl_seconds"),
    ({"extra_config": {"remote_pool_size": 0}}, "remote_pool_size"),
])
def test_bad_remote_config_names_the_key(tmp_path, overrides, fragment) -> None:
    values = {"remote_url": "redis://127.0.0.1:1", **overrides}
    with pytest.raises(ConfigError, match=fragment):
        make_config(tmp_path, **values)


def test_an_unknown_remote_serde_names_the_methods(tmp_path) -> None:
    with pytest.raises(ConfigError, match="remote_serde.*kivi.*naive.*cachegen"):
        InstanceAgent(make_config(tmp_path, remote_url="redis://127.0.0.1:1", remote_serde="kivi"))


async def test_the_remote_store_continues_a_local_prefix(agents, tmp_path, redis_srv) -> None:
    """Chunks 0-1 in memory only, 2-3 in the remote store only: the engine's read joins them."""
    a = await agents(remote_config(tmp_path, redis_srv, "a", remote_write_through=False))
    kv = make_kv(16, seed=8)
    await a.store(TOKENS, kv, REMOTE)
    await a.store(TOKENS[:8], kv[:, :, :8], CPU)
    assert redis_srv.client.delete(redis_key(redis_srv, TOKENS, 0), redis_key(redis_srv, TOKENS, 1)) == 2
    assert await a.lookup(TOKENS, REMOTE) == 0 and await a.lookup(TOKENS, CPU) == 8
    assert await a.lookup(TOKENS) == 16
    n, got = await a.retrieve(TOKENS)
    assert n == 16 and torch.equal(got, kv)


async def test_rewriting_a_pinned_chunk_keeps_its_pin(agents, tmp_path, redis_srv) -> None:
    agent = await agents(remote_config(tmp_path, redis_srv, "a", remote_ttl_seconds=100))
    kv = make_kv(4, seed=9)
    await agent.store(TOKENS[:4], kv, REMOTE)
    assert await agent.set_pinned(REMOTE, TOKENS[:4], True) == 4
    await agent.put_chunks(TOKENS[:4], kv, REMOTE, overwrite=True)
    assert redis_srv.client.ttl(redis_key(redis_srv, TOKENS, 0)) == -1
    final = [m async for m in await agent.compress(TOKENS[:4], "int8", REMOTE)][-1]
    assert final.chunks_done == 1 and redis_srv.client.ttl(redis_key(redis_srv, TOKENS, 0)) == -1
    assert (await agent.stats()).locations[-1].num_pinned == 1
