"""`cachegen` delta streams: a stream may carry the differences of consecutive symbols (delta.py,
FORMAT.md section 4 "Delta streams"), flagged by bit 7 of its table byte.

The transform is lossless on the symbols, so a codec with delta streams decodes exactly what one
without them decodes; only the size changes. Three implementations compute it (torch, the compiled
statistics pass, and the compiled rANS encode/decode loops) and must agree exactly.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError, container
from kvmesh.codecs.cachegen import delta
from kvmesh.codecs.cachegen.backends import CpuBackend
from kvmesh.codecs.cachegen.codec import CacheGenCodec, stream_meta
from kvmesh.codecs.cachegen.layout import stream_layout
from kvmesh.codecs.cachegen.levels import LEVELS
from kvmesh.codecs.cachegen.quant import SEGMENT
from kvmesh.codecs.cachegen.tables import NUM_TABLES

from .conftest import bits, kv_like
from tests.codecs.reference.backend import ReferenceBackend



def random_symbols(levels: np.ndarray, tokens: int, channels: int, seed: int) -> torch.Tensor:
    """uint8 [2, L, R, C], each (K/V, layer) below its alphabet size; half the channels random walks
    (what delta streams are for), half independent draws."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in levels:
        layer = []
        for b in row:
            walk = torch.cumsum(torch.randint(-1, 2, (tokens, channels), generator=g), 0) + int(b) // 2
            iid = torch.randint(0, int(b), (tokens, channels), generator=g)
            x = torch.where(torch.arange(channels) % 2 == 0, walk, iid)
            layer.append(torch.remainder(x, int(b)))
        out.append(torch.stack(layer))
    return torch.stack(out).to(torch.uint8)


SHAPES = [(1, 1), (5, 3), (255, 7), (256, 4), (257, 5), (600, 3)]
LEVELS_2x3 = np.array([[2, 5, 28], [256, 7, 3]])


@pytest.mark.parametrize("tokens,channels", SHAPES)
def test_transform_round_trip_and_definition(tokens: int, channels: int) -> None:
    q = random_symbols(LEVELS_2x3, tokens, channels, seed=tokens)
    d = delta.forward(q, LEVELS_2x3)
    b = torch.as_tensor(LEVELS_2x3).reshape(2, 3, 1, 1)
    # the definition, element by element
    for t in range(tokens):
        want = q[:, :, t] if t % SEGMENT == 0 else torch.remainder(
            q[:, :, t].long() - q[:, :, t - 1].long() + b[..., 0] // 2, b[..., 0])
        assert torch.equal(d[:, :, t].long(), want.long()), f"token {t}"
    assert torch.equal(delta.inverse(d, LEVELS_2x3), q)
    assert int((d.long() < b).all()) == 1, "a delta symbol left its alphabet"


@pytest.mark.parametrize("tokens,channels", SHAPES)
def test_compiled_coder_codes_delta_streams_as_the_reference(tokens: int, channels: int) -> None:
    """rans_encode/rans_decode with delta flags: the compiled loops (which take the differences on
    the fly) write and read exactly the numpy reference's words, for lanes of 4 channels and the
    ragged rest, one or several segments."""
    q = random_symbols(LEVELS_2x3, tokens, channels, seed=7 + tokens)
    layout = stream_layout(3, tokens, channels, LEVELS_2x3)
    ref, nat = ReferenceBackend(), CpuBackend()
    flags = np.random.RandomState(tokens).rand(layout.num_streams) < 0.5
    center, table, _ = ref.stream_models(q, layout, (False, False))
    d = delta.forward(q, LEVELS_2x3, flags)
    center, table = ref.choose_tables(ref.histogram(d, layout), layout)  # models of what the streams carry
    words, counts = ref.rans_encode(q, center, table, layout, flags)
    w2, c2 = nat.rans_encode(q, center, table, layout, flags)
    assert np.array_equal(words, w2) and np.array_equal(counts, c2)
    for be in (ref, nat):
        assert torch.equal(be.rans_decode(np.asarray(words), np.asarray(counts), center, table, layout, flags), q)


def test_flags_select_streams() -> None:
    """Only the flagged streams (K/V, layer, channel, segment) change; the others are copied."""
    tokens, channels = 300, 4
    q = random_symbols(LEVELS_2x3, tokens, channels, seed=1)
    layout = stream_layout(3, tokens, channels, LEVELS_2x3)
    flags = np.zeros(layout.num_streams, dtype=bool)
    k = ((1 * 3 + 2) * channels + 3) * layout.nseg + 1  # V, layer 2, channel 3, second segment
    flags[k] = True
    d = delta.forward(q, LEVELS_2x3, flags)
    changed = (d != q).nonzero().tolist()
    assert changed
    for kv_, layer, t, c in changed:
        assert (kv_, layer, c) == (1, 2, 3) and t > SEGMENT, "an unflagged stream or a stream's first symbol changed"
    assert torch.equal(delta.inverse(d, LEVELS_2x3, flags), q)


@pytest.mark.parametrize("native_on", [False, True])
def test_choose_tables_cost_is_the_least_cost(native_on: bool) -> None:
    tokens, channels = 257, 5
    q = random_symbols(LEVELS_2x3, tokens, channels, seed=3)
    layout = stream_layout(3, tokens, channels, LEVELS_2x3)
    be = (CpuBackend() if native_on else ReferenceBackend())
    hist = be.histogram(q, layout)
    center, table, cost = be.choose_tables(hist, layout, with_cost=True)
    assert np.array_equal(cost, delta.stream_costs(hist, center, table, layout))
    # no other table is cheaper for any stream
    for t in range(NUM_TABLES):
        other = delta.stream_costs(hist, center, np.full_like(table, t), layout)
        assert np.all(cost <= other)


@pytest.mark.parametrize("halves", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("tokens,channels", [(1, 1), (255, 7), (257, 5), (600, 3)])
def test_fused_models_match_the_stages(halves: tuple[bool, bool], tokens: int, channels: int) -> None:
    """The compiled one-pass statistics equal histogram -> choose (numpy reference) -> compare, and
    only the halves (K, V) allowed get delta streams."""
    q = random_symbols(LEVELS_2x3, tokens, channels, seed=tokens + channels)
    layout = stream_layout(3, tokens, channels, LEVELS_2x3)
    got = CpuBackend().stream_models(q, layout, halves)
    want = ReferenceBackend().stream_models(q, layout, halves)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
    flags = got[2].reshape(2, -1)
    for half in (0, 1):
        if not halves[half]:
            assert not flags[half].any()
        elif tokens > 16:  # (one symbol has no differences to code)
            assert flags[half].any(), "random walks should make some delta streams cheaper"


def walking_keys(layers: int = 2, tokens: int = 64, channels: int = 16, seed: int = 5) -> torch.Tensor:
    """KV whose key channels drift slowly over tokens (as low-frequency RoPE pairs do)."""
    kv = kv_like(layers, tokens, channels, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    kv[0] = torch.cumsum(0.3 * torch.randn(layers, tokens, channels, generator=g), dim=1)
    return kv.to(torch.float16)


def table_bytes(blob: bytes) -> np.ndarray:
    meta = np.frombuffer(stream_meta(blob), np.uint8)
    return meta[meta.size // 2:]


@pytest.mark.parametrize("level", ["default", "hq"])
def test_codec_uses_delta_streams_losslessly(level: str) -> None:
    kv = walking_keys()
    with_delta = CacheGenCodec(LEVELS[level])
    without = CacheGenCodec(dataclasses.replace(LEVELS[level], delta=(False, False)))
    a, b = with_delta.encode(kv), without.encode(kv)
    flags = table_bytes(a) >= delta.DELTA_FLAG
    assert flags.any(), "drifting keys should give delta streams"
    assert not (table_bytes(b) >= delta.DELTA_FLAG).any()
    assert len(a) < len(b)
    # the same symbols either way: identical decoded tensors, and each codec reads the other's blob
    out = with_delta.decode(a)
    assert torch.equal(bits(out), bits(without.decode(b)))
    assert torch.equal(bits(without.decode(a)), bits(out))
    assert torch.equal(bits(with_delta.decode(b)), bits(out))


def test_numpy_reference_writes_the_same_bytes() -> None:
    kv = walking_keys(tokens=300)
    a = CacheGenCodec(LEVELS["default"], ReferenceBackend()).encode(kv)
    assert (table_bytes(a) >= delta.DELTA_FLAG).any()
    assert CacheGenCodec(LEVELS["default"], CpuBackend()).encode(kv) == a


def forge_table_byte(blob: bytes, stream: int, value: int) -> bytes:
    """Sets one stream's table byte and re-seals the CRC, so only the codec's own checks can object."""
    header, sections = container.unpack(blob)
    sections = [bytes(s) for s in sections]
    meta = bytearray(stream_meta(blob))  # written back raw: a reader takes either form
    meta[len(meta) // 2 + stream] = value
    sections[4] = bytes(meta)
    out = container.pack(header.codec_id, header.level_id, header.dtype, header.shape, sections)
    assert zlib.crc32(out[:-4]) == int.from_bytes(out[-4:], "little")
    return out


@pytest.mark.parametrize("value", [NUM_TABLES, 0x7F, delta.DELTA_FLAG | NUM_TABLES, 0xFF])
def test_out_of_range_table_with_or_without_flag_is_rejected(value: int) -> None:
    codec = CacheGenCodec(LEVELS["default"])
    blob = codec.encode(walking_keys())
    with pytest.raises(CodecError, match="table index out of range"):
        codec.decode(forge_table_byte(blob, 0, value))


def test_a_flipped_flag_changes_only_its_stream() -> None:
    """The flag is data: flipping it (with a valid CRC) decodes that stream differently, every other
    element exactly as before, and never raises or leaves the alphabet."""
    codec = CacheGenCodec(LEVELS["default"])
    kv = walking_keys(layers=1, tokens=40, channels=4)
    blob = codec.encode(kv)
    tables = table_bytes(blob)
    k = 1  # K, layer 0, channel 1
    forged = forge_table_byte(blob, k, int(tables[k]) ^ delta.DELTA_FLAG)
    a, b = codec.decode(blob).float(), codec.decode(forged).float()
    diff = (a != b).nonzero().tolist()
    assert diff and all(kv_ == 0 and c == 1 and t >= 2 for kv_, _, t, c in diff)
