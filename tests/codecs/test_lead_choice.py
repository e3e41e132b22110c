"""`cachegen`'s lead token is a writer's choice per chunk (codec.CacheGenCodec.for_chunk).

Only a sequence's first token is the attention sink that the lead row keeps at 8 bits; a chunk that does
not start a sequence is written with lead 0 (an empty section 1, FORMAT.md §2), which every reader
follows. The agent asks for the writer by the chunk's start (instance_agent.methods.CodecSet.get)."""
from __future__ import annotations

import pytest
import torch

from kvmesh.codecs import container, get_codec
from kvmesh.codecs.cachegen.levels import SHORT_CHUNK
from kvmesh.instance_agent.methods import CodecSet

from .conftest import kv_like
from .test_layer_prediction import random_predictor

L, C = 3, 24
KEYS, VALUES = [20, 28, 14], [7, 7, 5]


def lead_of(blob: bytes) -> int:
    """Section 0's lead byte (FORMAT.md §2: uint8 key mode, value mode, uint16 segment, family, lead)."""
    return bytes(container.unpack(blob)[1][0])[5]


def test_a_sequences_first_chunk_keeps_its_lead_and_later_chunks_write_none() -> None:
    codec = get_codec("cachegen", backend="cpu", schedule=(KEYS, VALUES, 16), predictor=random_predictor())
    kv = kv_like(L, SHORT_CHUNK, C, seed=7)
    assert codec.for_chunk(0) is codec
    later = codec.for_chunk(SHORT_CHUNK)
    assert later is codec.for_chunk(3 * SHORT_CHUNK), "the twin is made once"
    first_blob, later_blob = codec.encode(kv), later.encode(kv)
    assert lead_of(first_blob) == 1 and lead_of(later_blob) == 0
    assert len(bytes(container.unpack(later_blob)[1][1])) == 0, "lead 0: section 1 is empty"
    assert len(later_blob) < len(first_blob), "the 8-bit lead row is not paid for"
    # any reader follows the container: the plain codec decodes the twin's, the twin the plain one's
    assert torch.equal(codec.decode(later_blob), later.decode(later_blob))
    assert torch.equal(later.decode(first_blob), codec.decode(first_blob))
    # the twin's first row is coded like every other row: as close as the rest, not 8-bit exact
    x, out = kv.float(), codec.decode(later_blob).float()
    err = (out - x).abs()
    assert float(err[:, :, 0].mean()) < 2 * float(err[:, :, 1:].mean())
    assert float(err[:, :, 0].mean()) > 2 * float((codec.decode(first_blob).float() - x)[:, :, 0].abs().mean())


def test_the_twin_keeps_everything_but_the_lead() -> None:
    codec = get_codec("cachegen", backend="cpu", schedule=(KEYS, VALUES, 16))
    later = codec.for_chunk(1)
    assert later.level.lead_tokens == 0 and codec.level.lead_tokens == 1
    assert later.level.key_levels == codec.level.key_levels and later.level.tail_tokens == 16
    assert later.level.protect == codec.level.protect and later.name == codec.name


def test_the_agents_codec_set_gives_the_writer_for_a_chunks_start() -> None:
    codecs = CodecSet()
    first, later = codecs.get("cachegen", 0), codecs.get("cachegen", SHORT_CHUNK)
    assert first is codecs.get("cachegen") and later is first.for_chunk(SHORT_CHUNK) and later is not first
    assert codecs.get("lossless", SHORT_CHUNK) is codecs.get("lossless"), "codecs without a lead choice"


@pytest.mark.parametrize("with_predictor", [False, True], ids=["plain", "predictor"])
def test_the_device_pipeline_writes_the_same_lead_free_chunk(with_predictor: bool) -> None:
    """Both device encodes (with and without a layer predictor) write a later chunk with lead 0, the CPU's
    bytes, and decode it to the CPU's tensor."""
    from tests.codecs.test_triton_kernels import DEVICE, load_kernels

    load_kernels()
    kv = kv_like(L, SHORT_CHUNK, C, dtype=torch.float16, seed=8)
    pred = random_predictor(layers=L, channels=C) if with_predictor else None
    cpu = get_codec("cachegen", backend="cpu", schedule=(KEYS, VALUES, 16), predictor=pred).for_chunk(SHORT_CHUNK)
    tri = get_codec("cachegen", backend="triton", schedule=(KEYS, VALUES, 16), predictor=pred).for_chunk(SHORT_CHUNK)
    blob = tri.encode(kv.to(DEVICE))
    assert lead_of(blob) == 0
    assert blob == cpu.encode(kv)
    assert torch.equal(tri.decode(blob).cpu().view(torch.int16), cpu.decode(blob).view(torch.int16))
