"""`int8`, `int4`, `fp8` and `lmcache-cachegen`: error bounds against a float64 reference."""
from __future__ import annotations

import pytest
import torch

from kvmesh.codecs import get_codec
from kvmesh.codecs.lmcache import CDF_ENTRIES, lmcache_bins
from kvmesh.codecs.quantized import SEGMENT

from .conftest import kv_like


def _uniform_bound(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keys per (layer, channel, 256-token segment), values per (layer, token): half a step."""
    steps = 2**bits - 1
    k, v = x[0], x[1]
    kb = torch.empty_like(k)
    for s in range(0, k.shape[1], SEGMENT):
        seg = k[:, s : s + SEGMENT]
        # fp16 bounds are widened outwards by up to one fp16 ulp (2^-10 relative) each
        d = seg.amax(1, keepdim=True) - seg.amin(1, keepdim=True) + 2.0**-9 * seg.abs().amax(1, keepdim=True)
        kb[:, s : s + SEGMENT] = (d / steps / 2).expand_as(seg)
    d = v.amax(2, keepdim=True) - v.amin(2, keepdim=True) + 2.0**-9 * v.abs().amax(2, keepdim=True)
    vb = (d / steps / 2).expand_as(v)
    return torch.stack([kb, vb])


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("shape", [(3, 40, 24), (1, 1, 1), (2, 257, 7), (1, 300, 5)])
def test_uniform_within_half_step(name, bits, shape):
    kv = kv_like(*shape, dtype=torch.float32)
    codec = get_codec(name)
    blob = codec.encode(kv)
    assert len(blob) == codec.max_encoded_size(kv.shape, kv.dtype)
    out = codec.decode(blob)
    x = kv.double()
    err = (out.double() - x).abs()
    bound = _uniform_bound(x, bits) * 1.002 + 1e-6
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_relative_error(dtype):
    kv = kv_like(2, 50, 16, dtype=dtype)
    codec = get_codec("fp8")
    out = codec.decode(codec.encode(kv))
    assert out.dtype == dtype and out.shape == kv.shape
    x = kv.double()
    scale = x.abs().amax(dim=3, keepdim=True) / 448
    # e4m3: 3 mantissa bits -> relative error <= 2^-4; below 2^-6 * scale the subnormal step 2^-9 * scale
    bound = x.abs() * 2.0**-4 + scale * 2.0**-9 * 1.01 + x.abs() * 2.0**-7 + 1e-6
    assert bool(((out.double() - x).abs() <= bound).all())


def test_lmcache_bounds_and_stored_cdf():
    kv = kv_like(12, 64, 16, dtype=torch.float32)
    codec = get_codec("lmcache-cachegen")
    blob = codec.encode(kv)
    assert len(blob) <= codec.max_encoded_size(kv.shape, kv.dtype)
    out = codec.decode(blob)
    x = kv.double()
    mx = torch.from_numpy(lmcache_bins(12) / 2 - 1).double()[:, :, None, None]
    bound = x.abs().amax(dim=3, keepdim=True) / mx / 2 * 1.002 + 1e-6
    assert bool(((out.double() - x).abs() <= bound).all())
    # LMCache stores a 33-entry 16-bit CDF per (K/V, layer, channel): that cost is in the container
    assert len(blob) > 2 * 12 * 16 * CDF_ENTRIES * 2


def test_lmcache_bins_follow_lmcache():
    b = lmcache_bins(30)
    assert list(b[0, :10]) == [32] * 10 and set(b[0, 10:]) == {16}
    assert list(b[1, :2]) == [32, 32] and set(b[1, 2:]) == {16}
