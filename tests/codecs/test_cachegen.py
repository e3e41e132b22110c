"""`cachegen` on the CPU path: error bounds against a float64 reference, odd shapes, edge values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError, get_codec, inspect
from kvmesh.codecs.cachegen import quant
from kvmesh.codecs.cachegen.levels import LEVELS

from .conftest import kv_like

# fp16 bounds are rounded outwards (relative 2^-10 at most) and fp32 arithmetic adds a few ulps
SLACK = 1.002


def _rest_bound(x: torch.Tensor, levels: np.ndarray, mode: int) -> torch.Tensor:
    """float64 reference for the largest error quantization may make, per element of x [L, T, C]."""
    L, T, C = x.shape
    bm1 = torch.tensor(levels, dtype=torch.float64).reshape(L, 1, 1) - 1
    # fp16 bounds are widened outwards by up to one fp16 ulp (2^-10 relative) each
    if mode == quant.MODE_TOKEN_SYMMETRIC:
        a = x.abs().amax(dim=2, keepdim=True) * (1 + 2.0**-10)
        return (2 * a / bm1 / 2).expand(L, T, C)
    if mode == quant.MODE_TOKEN:
        d = x.amax(dim=2, keepdim=True) - x.amin(dim=2, keepdim=True) + 2.0**-9 * x.abs().amax(dim=2, keepdim=True)
        return (d / bm1 / 2).expand(L, T, C)
    out = torch.empty(L, T, C, dtype=torch.float64)
    for s in range(0, T, quant.SEGMENT):
        seg = x[:, s : s + quant.SEGMENT]
        d = seg.amax(dim=1, keepdim=True) - seg.amin(dim=1, keepdim=True) + 2.0**-9 * seg.abs().amax(dim=1, keepdim=True)
        if mode == quant.MODE_CHANNEL_SHARED_STEP:
            d = d.amax(dim=2, keepdim=True)
        out[:, s : s + quant.SEGMENT] = (d / bm1 / 2).expand_as(seg)
    return out


def check_bounds(name: str, kv: torch.Tensor) -> torch.Tensor:
    codec = get_codec(name, backend="cpu")
    blob = codec.encode(kv)
    out = codec.decode(blob)
    assert out.shape == kv.shape and out.dtype == kv.dtype
    assert len(blob) <= codec.max_encoded_size(kv.shape, kv.dtype)
    level = LEVELS[codec.level.name]
    x = kv.to(torch.float64)
    L = kv.shape[1]
    levels = level.levels_for(L)
    lead = min(level.lead_tokens, kv.shape[2])
    err = (out.to(torch.float64) - x).abs()
    # the output dtype rounds once more: half an ulp of the value
    ulp = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[kv.dtype]
    for kv_i, mode in ((0, level.key_mode), (1, level.value_mode)):
        xi = x[kv_i]
        bound = torch.empty_like(xi)
        if lead:
            bound[:, :lead] = _rest_bound(xi[:, :lead], np.full(L, 256), quant.MODE_TOKEN)
        if kv.shape[2] > lead:
            bound[:, lead:] = _rest_bound(xi[:, lead:], levels[kv_i], mode)
        bound = bound * SLACK + xi.abs() * ulp * 2 + 1e-7
        bad = err[kv_i] > bound
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            pytest.fail(f"{name} {'KV'[kv_i]} error {float(err[kv_i][idx])} > bound {float(bound[idx])} at {idx}")
    return out


@pytest.mark.parametrize("name", ["cachegen", "cachegen-hq"])
@pytest.mark.parametrize("shape", [(3, 40, 24), (1, 1, 7), (2, 2, 5), (1, 257, 3), (2, 300, 10), (4, 33, 1)])
def test_round_trip_within_quantization_bounds(name, shape):
    check_bounds(name, kv_like(*shape, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_preserved(dtype):
    check_bounds("cachegen", kv_like(2, 70, 16, dtype=dtype))


def test_hq_is_more_accurate_and_larger():
    kv = kv_like(4, 256, 32, dtype=torch.float16)
    d, h = get_codec("cachegen"), get_codec("cachegen-hq")
    bd, bh = d.encode(kv), h.encode(kv)
    ed = (d.decode(bd).float() - kv.float()).pow(2).mean()
    eh = (h.decode(bh).float() - kv.float()).pow(2).mean()
    assert eh < ed / 4
    assert len(bh) > len(bd)
    assert inspect(bh).method == "cachegen-hq" and inspect(bh).level == "hq"


def test_compresses_structured_kv():
    kv = kv_like(4, 256, 64, dtype=torch.float16)
    assert len(get_codec("cachegen").encode(kv)) * 4 < kv.numel() * 2


def test_all_zero_and_constant_channels():
    kv = torch.zeros(2, 2, 300, 8)
    out = get_codec("cachegen").decode(get_codec("cachegen").encode(kv))
    assert torch.equal(out, kv)
    kv = kv_like(2, 300, 8, dtype=torch.float32)
    kv[0, :, :, 3] = 1.2345  # a constant key channel
    kv[1, 1, :, :] = -0.5  # a constant value layer
    kv[0, 0, :, 5] = 0.0
    check_bounds("cachegen", kv)


def test_encoding_is_deterministic():
    kv = kv_like(3, 100, 12)
    codec = get_codec("cachegen")
    assert codec.encode(kv) == codec.encode(kv.clone())


def test_values_beyond_fp16_range_are_rejected():
    kv = kv_like(1, 4, 4, dtype=torch.float32)
    kv[0, 0, 2, 1] = 70000.0
    with pytest.raises(CodecError, match="65504"):
        get_codec("cachegen").encode(kv)


def test_decode_to_device_argument():
    kv = kv_like(1, 8, 4)
    codec = get_codec("cachegen")
    assert codec.decode(codec.encode(kv), device="cpu").device.type == "cpu"


def test_fp16_directed_rounding_brackets_values():
    g = torch.Generator().manual_seed(1)
    v = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-8, 4, (4000,), generator=g),
                   torch.tensor([0.0, -0.0, 1e-9, -1e-9, 65504.0, -65504.0, 65503.9, -65503.9])])
    lo, hi = quant.fp16_round_down(v), quant.fp16_round_up(v)
    assert bool((lo.float() <= v).all()) and bool((hi.float() >= v).all())
    # and they are the nearest such fp16 values: one ulp further in would cross v
    exact = lo.float() == v
    assert bool((hi.float()[exact] == v[exact]).all())


def test_a_level_without_lead_tokens_round_trips() -> None:
    """lead = 0 is a valid container (params byte 5): every token goes through the streams."""
    import dataclasses

    from kvmesh.codecs.cachegen.codec import CacheGenCodec
    from kvmesh.codecs.cachegen.levels import LEVELS

    codec = CacheGenCodec(dataclasses.replace(LEVELS["hq"], lead_tokens=0))
    kv = kv_like(2, 33, 24)
    blob = codec.encode(kv)
    assert len(blob) < get_codec("cachegen-hq", backend="cpu").encode(kv).__len__()  # no 8-bit lead token
    back = codec.decode(blob)
    assert back.shape == kv.shape and (back.float() - kv.float()).abs().max() < 0.2 * kv.float().abs().max()


# ---- coded streams: G adjacent channels share one rANS state (layout.py, FORMAT.md §4) ------------

def _family_byte(blob: bytes) -> int:
    from kvmesh.codecs import container
    return bytes(container.unpack(blob)[1][0])[4]


def _with_family(blob: bytes, family: int) -> bytes:
    from kvmesh.codecs import container
    header, sections = container.unpack(blob)
    params = bytearray(sections[0])
    params[4] = family
    parts = [bytes(params)] + [bytes(s) for s in sections[1:]]
    return container.pack(header.codec_id, header.level_id, header.dtype, header.shape, parts)


@pytest.mark.parametrize("channels,group", [(24, 4), (6, 2), (7, 1)])
def test_channels_share_a_state_in_groups_of_up_to_4(channels, group):
    kv = kv_like(layers=2, tokens=40, channels=channels)
    blob = get_codec("cachegen", backend="cpu").encode(kv)
    assert _family_byte(blob) == 1 | (group.bit_length() - 1) << 4
    check_bounds("cachegen", kv)


def test_containers_with_one_channel_per_stream_still_decode(monkeypatch):
    """Containers written before coded streams (family byte 1: G = 1) decode to the same tensor:
    the symbols and their models are the same, only how they are cut into rANS states differs."""
    import kvmesh.codecs.cachegen.codec as cm
    kv = kv_like(layers=3, tokens=300, channels=16)
    codec = get_codec("cachegen", backend="cpu")
    new = codec.encode(kv)
    monkeypatch.setattr(cm, "channel_group", lambda channels: 1)
    old = codec.encode(kv)
    monkeypatch.undo()
    assert _family_byte(old) == 1 and _family_byte(new) == 0x21
    # 3 of every 4 states' start, flush and word count spared: 96 * 3 * 2 coded streams fewer
    assert len(old) - len(new) >= 2 * 3 * 16 * 2 // 4 * 3
    assert torch.equal(codec.decode(old), codec.decode(new))


@pytest.mark.parametrize("family,why", [(0x31, "channels per stream"), (0x41, "channels per stream"),
                                        (0x22, "table family")])
def test_bad_family_byte_is_rejected(family, why):
    """G = 8 does not divide 4 channels; G = 16 divides 32, but readers take G <= 8."""
    kv = kv_like(layers=1, tokens=10, channels=4 if family != 0x41 else 32)
    blob = get_codec("cachegen", backend="cpu").encode(kv)
    with pytest.raises(CodecError, match=why):
        get_codec("cachegen", backend="cpu").decode(_with_family(blob, family))
