"""Decodability travels with the chunk (issue 14.3): agents advertise the model files they decode
with; Move, ReceiveChunks, Compress and Decompress refuse chunks that cannot be decoded where they
would land, naming the missing file; the cachegen container says its variant with an explicit byte."""
from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.codecs import container, get_codec
from kvmesh.codecs.cachegen.codec import (VARIANT_BITS, VARIANT_CODED, VARIANT_PREDICTED, VARIANT_PROTECTED,
                                          CacheGenCodec, container_variant)
from kvmesh.codecs.cachegen.levels import LEVELS
from kvmesh.instance_agent.wire import chunk_to_proto
from tests.codecs.test_layer_prediction import random_predictor

from .conftest import CPU, DISK, make_config, make_kv, stub_for
from .test_service import collect, put

TOKENS = list(range(700, 732))


def without_variant_byte(blob: bytes) -> bytes:
    """The same container as written before the variant byte existed (sections 1-4 then zlib streams)."""
    from tests.codecs.reference.sidecode import zlib_form

    header, sections = container.unpack(zlib_form(blob))
    parts = [bytes(sections[0])[:-1]] + [bytes(s) for s in sections[1:]]
    return container.pack(header.codec_id, header.level_id, header.dtype, header.shape, parts)


def test_the_container_says_its_variant_and_old_ones_still_read(tmp_path) -> None:
    kv = make_kv(40, layers=3, channels=16, seed=1)
    pred = random_predictor(layers=3, channels=16, seed=2)
    plain = CacheGenCodec(dataclasses.replace(LEVELS["default"], protect=(0.0, 0.0)))  # protects no rows
    protecting = get_codec("cachegen", backend="cpu")
    predicted = get_codec("cachegen", backend="cpu", predictor=pred)
    cases = [(plain, 0, None), (protecting, VARIANT_PROTECTED, None), (predicted, VARIANT_BITS, pred.ident)]
    for codec, variant, ident in cases:
        blob = codec.encode(kv)
        assert container_variant(blob) == (variant | VARIANT_CODED, ident)  # bit 2: coded sections 1-4
        assert bytes(container.unpack(blob)[1][0])[-1] == variant | VARIANT_CODED, "the variant byte ends section 0"
        old = without_variant_byte(blob)
        assert container_variant(old) == (variant, ident), "old containers: by their section count"
        assert torch.equal(codec.decode(old), codec.decode(blob))


@pytest.mark.parametrize("variant", [0x08, VARIANT_PREDICTED])
def test_a_variant_byte_that_disagrees_is_corrupt(variant) -> None:
    from kvmesh.codecs import CodecError

    blob = get_codec("cachegen", backend="cpu").encode(make_kv(20, layers=2, channels=8))
    header, sections = container.unpack(blob)
    params = bytearray(sections[0])
    params[-1] = variant
    bad = container.pack(header.codec_id, header.level_id, header.dtype, header.shape,
                         [bytes(params)] + [bytes(s) for s in sections[1:]])
    with pytest.raises(CodecError, match="variant"):
        get_codec("cachegen", backend="cpu").decode(bad)


async def predictor_agent(agents, tmp_path, name: str, **kw):
    path = random_predictor(layers=3, channels=16, seed=2).save(tmp_path / f"{name}.npz")
    cfg = make_config(tmp_path / name, chunk_size=16, enable_p2p=False,
                      extra_config={"cachegen_layer_predictor": str(path)}, **kw)
    return await agents(cfg), get_codec("cachegen", backend="cpu", predictor=path)


async def test_agents_advertise_their_model_files(agents, tmp_path) -> None:
    with_file, codec = await predictor_agent(agents, tmp_path, "a")
    without = await agents(make_config(tmp_path / "b", chunk_size=16))
    want = f"layer_predictor:{codec.predictor.ident.hex()}"
    for agent, files in ((with_file, [want]), (without, [])):
        channel, stub = stub_for(agent)
        async with channel:
            assert list((await stub.Stats(agent_pb2.StatsRequest())).model_files) == files
            assert list((await stub.Health(agent_pb2.HealthRequest())).model_files) == files


async def test_move_and_receive_refuse_chunks_the_target_cannot_decode(agents, tmp_path) -> None:
    source, codec = await predictor_agent(agents, tmp_path, "a")
    target = await agents(make_config(tmp_path / "b", chunk_size=16))
    need = f"layer_predictor:{codec.predictor.ident.hex()}"
    ch_s, s = stub_for(source)
    ch_t, t = stub_for(target)
    async with ch_s, ch_t:
        await put(s, TOKENS, make_kv(32, layers=3, channels=16, seed=6), CPU)
        final = (await collect(s.Compress(agent_pb2.CompressRequest(method="cachegen", location=CPU, tokens=TOKENS))))[-1]
        assert final.chunks_done == 2 and not final.error

        msgs = await collect(s.Move(agent_pb2.MoveRequest(location=CPU, tokens=TOKENS, target_url=f"localhost:{target.grpc_port}",
                                                          target_location=CPU)))
        final = msgs[-1]
        assert final.chunks_done == 0 and final.chunks_failed == 1
        assert need in final.error and "does not hold" in final.error
        assert await source.lookup(TOKENS, CPU) == 32, "nothing left the source"
        assert await target.lookup(TOKENS, CPU) == 0, "nothing undecodable landed on the target"

        # The target checks on receipt too (a sender that did not ask).
        chunk = source.locations[CPU].get(source.spans(TOKENS)[0].key)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await t.ReceiveChunks(agent_pb2.ReceiveChunksRequest(location=CPU, chunks=[chunk_to_proto(chunk)]))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert need in info.value.details() and "chunks[0]" in info.value.details()
        assert await target.lookup(TOKENS, CPU) == 0

        # Raw chunks need no model file: they move.
        raw = list(range(5000, 5016))
        await put(s, raw, make_kv(16, layers=3, channels=16, seed=7), CPU)
        final = (await collect(s.Move(agent_pb2.MoveRequest(location=CPU, tokens=raw,
                                                            target_url=f"localhost:{target.grpc_port}"))))[-1]
        assert final.chunks_done == 1 and not final.error
        assert await target.lookup(raw, CPU) == 16


async def test_compress_and_decompress_name_the_missing_file(agents, tmp_path) -> None:
    """Chunks coded with a predictor, on the disk of an agent restarted without it."""
    first, codec = await predictor_agent(agents, tmp_path, "a")
    await first.store(TOKENS, make_kv(32, layers=3, channels=16, seed=6), DISK)
    final = [m async for m in await first.compress(TOKENS, "cachegen", DISK)][-1]
    assert final.chunks_done == 2
    await first.stop()
    need = f"layer_predictor:{codec.predictor.ident.hex()}"
    later = await agents(make_config(tmp_path / "a", chunk_size=16))  # the same disk folder, no predictor
    assert await later.lookup(TOKENS, DISK) == 32
    for op in (later.compress(TOKENS, "int8", DISK), later.decompress(TOKENS, "", DISK)):
        final = [m async for m in await op][-1]
        assert final.chunks_failed == 2 and final.chunks_done == 0
        assert all(need in e for e in final.errors)
    entry = later.locations[DISK].entry(later.spans(TOKENS)[0].key)
    assert entry.method == "cachegen", "the chunks were left as they were"
