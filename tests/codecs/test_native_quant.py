"""The compiled elementwise quantization step (native.quantize, _ransc.c) equals quant.quantize's torch
arithmetic exactly, for every mode, odd shapes, flat groups and every level count in use."""
from __future__ import annotations

import pytest
import torch

from kvmesh.codecs.cachegen import native, quant
from kvmesh.codecs.cachegen.backends import CpuBackend
from kvmesh.codecs.cachegen.codec import CacheGenCodec
from kvmesh.codecs.cachegen.levels import LEVELS

from .conftest import kv_like
from tests.codecs.reference.backend import ReferenceBackend
from .reference.backend import protected_rows as reference_protected_rows



@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 300, 24), (2, 513, 10)])
@pytest.mark.parametrize("mode", quant.MODES)
def test_native_quantize_matches_torch(shape: tuple[int, int, int], mode: int) -> None:
    kv = kv_like(*shape, dtype=torch.float32, seed=sum(shape) + mode)
    x = kv[mode % 2].clone()
    x[:, :, 0] = 0.0  # a flat channel
    x[0, 0, :] = 1.5  # a flat row
    x[-1, -1, -1] = 65504.0  # the fp16 extreme
    for levels in (2, 7, 28, 256):
        lv = torch.full((shape[0],), float(levels))
        want, _ = quant.quantize(x, lv, mode)
        _, lo, inv, bm1 = quant.quantize_params(x, lv, mode)
        got = native.quantize(x.contiguous(), lo, inv, bm1, mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP))
        assert torch.equal(got, want), f"levels {levels}"


@pytest.mark.parametrize("level", ["default", "hq", "compact"])
def test_codec_bytes_with_and_without_compiled_stages(level: str) -> None:
    for seed, shape in enumerate([(2, 37, 24), (3, 260, 16)]):
        kv = kv_like(*shape, dtype=torch.float16, seed=seed)
        nat = CacheGenCodec(LEVELS[level], CpuBackend()).encode(kv)
        ref = CacheGenCodec(LEVELS[level], ReferenceBackend()).encode(kv)
        assert nat == ref


def test_row_sums_are_the_exact_float64_sums() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, 192, generator=g) * torch.logspace(-9, 4, 50).reshape(1, 50, 1)
    x[0, 0] = 0.0
    x[0, 1] = -65504.0  # the largest magnitude, negative
    x[0, 2, :7] = 2.0 ** -24  # subnormals
    h = x.to(torch.float16)
    want = torch.abs(h).sum(dim=2, dtype=torch.float64)
    assert torch.equal(native.row_sums(h), want)


def test_protected_row_selection_native_equals_torch() -> None:
    from kvmesh.codecs.cachegen.codec import protected_rows

    x = kv_like(3, 200, 24, dtype=torch.float32, seed=9)
    x[1, 1, 5] *= 0.02
    x[1, 2, 17] *= 0.2
    for thresholds in [(0.0, 0.35), (0.7, 0.35), (0.0, 0.0)]:
        a = protected_rows(x, thresholds)
        b = reference_protected_rows(x, thresholds)
        assert torch.equal(a, b)
    assert bool(protected_rows(x, (0.0, 0.35))[1, 1, 5])


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 513, 10)])
@pytest.mark.parametrize("mode", quant.MODES)
def test_native_dequantize_matches_torch(shape: tuple[int, int, int], mode: int) -> None:
    x = kv_like(*shape, dtype=torch.float32, seed=5 + mode)[mode % 2]
    for levels in (2, 7, 28, 256):
        lv = torch.full((shape[0],), float(levels))
        q, side = quant.quantize(x, lv, mode)
        want = quant.dequantize(q, side, lv, mode)
        lo, step = quant.dequantize_params(side, lv, mode)
        got = native.dequantize(q, lo, step, mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP))
        assert torch.equal(got.view(torch.int32), want.contiguous().view(torch.int32)), f"levels {levels}"


@pytest.mark.parametrize("level", ["default", "hq", "compact"])
def test_codec_decode_with_and_without_compiled_stages(level: str) -> None:
    kv = kv_like(3, 260, 16, dtype=torch.float16, seed=2)
    blob = CacheGenCodec(LEVELS[level]).encode(kv)
    a = CacheGenCodec(LEVELS[level], CpuBackend()).decode(blob)
    b = CacheGenCodec(LEVELS[level], ReferenceBackend()).decode(blob)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
