"""`lossless`: bit-exact round trips, including odd shapes, signed zeros and incompressible data."""
from __future__ import annotations

import pytest
import torch

from kvmesh.codecs import get_codec

from .conftest import bits, kv_like


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 40, 24), (1, 33, 7), (2, 257, 3)])
def test_round_trip_is_bit_exact(dtype, shape):
    kv = kv_like(*shape, dtype=dtype)
    kv[0, 0, 0, 0] = -0.0
    codec = get_codec("lossless")
    blob = codec.encode(kv)
    out = codec.decode(blob)
    assert out.dtype == dtype and out.shape == kv.shape
    assert torch.equal(bits(out), bits(kv))
    assert len(blob) <= codec.max_encoded_size(kv.shape, dtype)


def test_incompressible_data_stays_within_max_size():
    # random bit patterns (finite): deflate cannot shrink them, the stored mode takes over
    raw = torch.randint(0, 2**16, (2 * 2 * 64 * 16,), dtype=torch.int32).to(torch.int16)
    kv = raw.view(torch.float16).reshape(2, 2, 64, 16)
    kv = torch.where(torch.isfinite(kv), kv, torch.zeros_like(kv))
    codec = get_codec("lossless")
    blob = codec.encode(kv)
    assert len(blob) <= codec.max_encoded_size(kv.shape, kv.dtype)
    assert torch.equal(bits(codec.decode(blob)), bits(kv))


def test_compresses_real_looking_kv():
    kv = kv_like(4, 256, 64, dtype=torch.bfloat16)
    assert len(get_codec("lossless").encode(kv)) < kv.numel() * 2
