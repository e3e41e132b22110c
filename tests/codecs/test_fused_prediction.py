"""The CPU's fused steps of cross-layer prediction (CpuBackend.quantize_predicted / add_predictions over
native.predict_parts, layer_residual and quantize_layer): the same bits as the stage-by-stage loop of
codec.py and the torch/numpy reference, entry point by entry point (every mode, odd shapes, level
counts from 2 to 256, with and without the query profile, the prediction and protected rows) and
container by container (every level, with and without the model files)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmesh.codecs import QueryProfile
from kvmesh.codecs.cachegen import native, quant
from kvmesh.codecs.cachegen.backends import CpuBackend, _layer_views
from kvmesh.codecs.cachegen.codec import CacheGenCodec
from kvmesh.codecs.cachegen.levels import LEVELS
from kvmesh.codecs.cachegen.predict import levels_from_spans, quantile_linear, residual_levels

from .conftest import bits, kv_like
from .test_key_rounding import correlated_moments
from .test_layer_prediction import random_predictor, related_kv
from tests.codecs.reference.backend import ReferenceBackend
from tests.codecs.reference.predict import predict_reference
from tests.codecs.reference.rounding import quantize_keys as reference_quantize_keys

CHANNEL_MODES = (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP)


def test_fp16_bounds_equal_torch_on_every_kind_of_value() -> None:
    """Normal, subnormal, zero, ties, the fp16 extremes and beyond (to infinity), random bit patterns."""
    g = np.random.default_rng(5)
    edges = np.array([0.0, -0.0, 65504.0, -65504.0, 65519.99, 65520.0, -65520.0, 1e9, 2.0 ** -24, 2.0 ** -25,
                      3 * 2.0 ** -26, 2.0 ** -14, 1e-45, -1e-45, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11], np.float32)
    pattern = g.integers(0, 2 ** 32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([edges, pattern[np.isfinite(pattern)],
                        (g.standard_normal(50_000) * np.logspace(-9, 4.8, 50_000)).astype(np.float32)])
    lo, hi = native.f16_bounds(x)
    t = torch.from_numpy(x)
    assert np.array_equal(lo.view(np.uint16), quant.fp16_round_down(t).numpy().view(np.uint16))
    assert np.array_equal(hi.view(np.uint16), quant.fp16_round_up(t).numpy().view(np.uint16))


def _reference_layer(x: torch.Tensor, levels: int, mode: int, profile: QueryProfile | None,
                     pred: torch.Tensor | None, mask: torch.Tensor | None, restored: torch.Tensor | None):
    lv = torch.full((1,), float(levels))
    x3 = x.unsqueeze(0)
    side = quant.quantize_params(x3, lv, mode)[0]
    q = reference_quantize_keys(x3, side, lv, mode, profile) if profile is not None else quant.quantize(x3, lv, mode)[0]
    y = quant.dequantize(q, side, lv, mode)[0]
    if pred is not None:
        y = y + pred
    if mask is not None:
        y[mask] = restored
    return q[0], side, y


@pytest.mark.parametrize("rows, channels, heads", [(1, 8, 1), (5, 24, 3), (64, 16, 2), (300, 24, 2), (513, 12, 1), (257, 40, 2)])
@pytest.mark.parametrize("mode", quant.MODES)
@pytest.mark.parametrize("extras", ["plain", "profile", "pred+rows", "all"])
def test_quantize_layer_equals_the_stages(rows: int, channels: int, heads: int, mode: int, extras: str) -> None:
    profiled = extras in ("profile", "all") and mode in CHANNEL_MODES
    g = torch.Generator().manual_seed(rows * 7 + channels + mode)
    x = (torch.randn(rows, channels, generator=g) * (1 + 3 * torch.rand(1, channels, generator=g))
         + torch.randn(1, channels, generator=g)).contiguous()
    x[:, 0] = 0.25  # a flat channel
    x[0] = 1.5  # a flat row
    profile = QueryProfile(correlated_moments(1, heads, channels // heads, seed=rows)) if profiled else None
    pred = mask = restored = None
    if extras in ("pred+rows", "all"):
        pred = torch.randn(rows, channels, generator=g)
        mask = torch.rand(rows, generator=g) < 0.2
        restored = torch.randn(int(mask.sum()), channels, generator=g)
    for levels in (2, 7, 28, 256):
        want_q, want_side, want_y = _reference_layer(x, levels, mode, profile, pred, mask, restored)
        side = [torch.empty(shape, dtype=dt) for shape, dt in quant.side_spec(mode, 1, rows, channels)]
        q = torch.empty(rows, channels, dtype=torch.uint8)
        y = torch.empty(rows, channels)
        native.quantize_layer(x, levels, mode, _layer_views(side, mode, 0), q, y, profile, pred,
                              None if mask is None else mask.numpy().astype(np.uint8), restored)
        assert torch.equal(q, want_q), f"levels {levels}"
        for got, want in zip(side, want_side):
            assert torch.equal(bits(got), bits(want)), f"levels {levels}"
        assert torch.equal(bits(y), bits(want_y)), f"levels {levels}"


@pytest.mark.parametrize("mode", quant.MODES)
@pytest.mark.parametrize("rows", [1, 9, 300])
def test_layer_residual_gives_the_spans_residual_levels_uses(mode: int, rows: int) -> None:
    g = torch.Generator().manual_seed(rows + mode)
    x, p = torch.randn(rows, 20, generator=g) * 4, torch.randn(rows, 20, generator=g) * 3
    x[0] = 0.0  # a token with no span: left out of the ratio
    r = torch.empty_like(x)
    sx, sr = native.layer_residual(x, p, mode, r)
    assert torch.equal(bits(r), bits(x - p))
    for base in (2, 7, 8, 28, 256):
        assert levels_from_spans(base, sx, sr) == residual_levels(base, x.unsqueeze(0), (x - p).unsqueeze(0), mode)


@pytest.mark.parametrize("narrow", [False, True], ids=["widest", "narrow"])
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("rows, width, channels", [(1, 1, 1), (7, 24, 24), (13, 40, 56), (255, 64, 72), (0, 3, 5)])
def test_predict_parts_equals_predict_on_the_concatenated_features(parts: int, rows: int, width: int, channels: int,
                                                                   narrow: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if narrow:
        monkeypatch.setenv("RANSC_NO_AVX512", "1")
    g = torch.Generator().manual_seed(parts * 100 + rows + width)
    xs = tuple(torch.randn(rows, width, generator=g) * 10 for _ in range(parts))
    w = (torch.randn(parts * width, channels, generator=g) / 5).numpy()
    b = torch.randn(channels, generator=g).numpy()
    want = predict_reference(torch.cat(xs, dim=1), torch.from_numpy(w), torch.from_numpy(b))
    out = torch.empty(rows, channels)
    assert torch.equal(bits(native.predict_parts(xs, w, b, out)), bits(want))
    base = torch.randn(rows, channels, generator=g)
    acc = base.clone()
    native.predict_parts(xs, w, b, acc, add=True)
    assert torch.equal(bits(acc), bits(base + want))


@pytest.mark.parametrize("level", ["default", "hq", "compact"])
@pytest.mark.parametrize("profiled", [False, True], ids=["no-profile", "profile"])
@pytest.mark.parametrize("shape", [(3, 40, 24), (2, 270, 8), (2, 2, 8), (3, 1, 24), (3, 33, 7)])
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-point", "fp32"])
def test_fused_and_stage_by_stage_containers_are_the_same_bytes(level: str, profiled: bool,
                                                                shape: tuple[int, int, int], fixed: bool) -> None:
    L, T, C = shape
    kv = related_kv(L, T, C, seed=T) if T > 2 else kv_like(L, T, C, seed=T)
    kv = kv.float()
    kv[1, :, T // 2] *= 0.05  # sink-like value rows: protected at every level that protects
    kv = kv.to(torch.float16)
    predictor = random_predictor(L, C, seed=T, scale=0.05)
    profile = QueryProfile(correlated_moments(L, 2, C // 2, seed=L)) if profiled and C % 2 == 0 else None
    fused = CacheGenCodec(LEVELS[level], CpuBackend(), profile, predictor, fixed_prediction=fixed)
    stages = CacheGenCodec(LEVELS[level], ReferenceBackend(), profile, predictor, fixed_prediction=fixed)
    blob = fused.encode(kv)
    assert blob == stages.encode(kv)
    assert torch.equal(bits(fused.decode(blob)), bits(stages.decode(blob)))


def test_the_fused_encoder_predicts_from_what_the_decoder_will_have() -> None:
    """A predictor fitted on related layers is used (section 8 marks predicted layers) and the fused
    decoder gives the reference's values."""
    from kvmesh.codecs import container
    from kvmesh.codecs.cachegen.codec import N_SECTIONS_PREDICTED
    from kvmesh.codecs.cachegen.predict import ID_BYTES, fit

    kv = related_kv(tokens=64)
    codec = CacheGenCodec(LEVELS["default"], CpuBackend(), predictor=fit([kv]))
    blob = codec.encode(kv)
    used = bytes(container.unpack(blob)[1][N_SECTIONS_PREDICTED - 1])[ID_BYTES:]
    assert sum(used) >= 2, used  # some layers were coded as residuals
    want = CacheGenCodec(LEVELS["default"], ReferenceBackend(), predictor=codec.predictor).decode(blob)
    assert torch.equal(bits(codec.decode(blob)), bits(want))
    plain = CacheGenCodec(LEVELS["default"], CpuBackend())
    err = (want.float() - kv.float()).norm() / kv.float().norm()
    assert err < 1.6 * (plain.decode(plain.encode(kv)).float() - kv.float()).norm() / kv.float().norm()


def test_quantile_linear_is_numpys_quantile() -> None:
    """levels_from_spans' quantile: np.quantile's value, bit for bit (sizes 1 .. 300, ties, all quantiles)."""
    g = np.random.default_rng(2)
    for n in [*range(1, 300, 7), 255, 1000]:
        a = g.standard_normal(n) ** 3
        a[: n // 4] = a[-1]  # ties
        for q in (0.0, 0.1, 0.25, 0.5, 0.6, 0.999, 1.0):
            assert quantile_linear(a, q) == float(np.quantile(a, q)), (n, q)
