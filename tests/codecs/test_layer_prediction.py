"""cachegen's cross-layer prediction (predict.py): the predictor file, the exact prediction arithmetic,
and containers coded against a predictor.

- the compiled, torch and (interpreted) Triton predictions are bit-identical, so are the containers;
- a container coded with a predictor decodes only with that predictor (clear CodecError otherwise);
- containers written without one decode as before;
- on KV whose layers are related, prediction saves bytes at the same step (the real model's gain is
  checked in tests/engine/test_layer_predictor.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError, LayerPredictor, container, get_codec, max_encoded_size
from kvmesh.codecs import decode as registry_decode
from kvmesh.codecs.cachegen import native
from kvmesh.codecs.cachegen import predict as predict_mod
from kvmesh.codecs.cachegen.backends import CpuBackend
from kvmesh.codecs.cachegen.codec import CacheGenCodec
from kvmesh.codecs.cachegen.levels import LEVELS
from kvmesh.codecs.cachegen.predict import fit, residual_levels
from tests.codecs.conftest import bits, kv_like
from tests.codecs.reference.backend import ReferenceBackend
from tests.codecs.reference.predict import predict_fixed_reference, predict_reference, to_fixed_reference
from tests.codecs.reference.sidecode import zlib_form



def random_predictor(layers: int = 3, channels: int = 24, seed: int = 0, scale: float = 0.1) -> LayerPredictor:
    g = np.random.default_rng(seed)
    n, C = layers - 1, channels
    return LayerPredictor(scale * g.standard_normal((n, 2 * C, C)), g.standard_normal((n, C)),
                          scale * g.standard_normal((n, 3 * C, C)), g.standard_normal((n, C)))


def related_kv(layers: int = 4, tokens: int = 96, channels: int = 24, seed: int = 0) -> torch.Tensor:
    """KV whose layers are linear images of one slowly changing hidden state, as in a transformer."""
    g = torch.Generator().manual_seed(seed)
    hidden = 4 * torch.randn(tokens, 48, generator=g)
    k, v = [], []
    for _ in range(layers):
        hidden = hidden + 0.3 * torch.randn(tokens, 48, generator=g)
        k.append(hidden @ torch.randn(48, channels, generator=g) / 7)
        v.append(hidden @ torch.randn(48, channels, generator=g) / 7)
    return torch.stack([torch.stack(k), torch.stack(v)]).to(torch.float16)


# -- the predictor file ------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path) -> None:
    p = random_predictor()
    q = LayerPredictor.load(p.save(tmp_path / "layers.npz"))
    assert q.ident == p.ident and q.layers == 3 and q.channels == 24
    assert np.array_equal(q.value_weights, p.value_weights)
    assert random_predictor(seed=1).ident != p.ident


def test_load_rejects_foreign_and_pickled_files(tmp_path) -> None:
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(CodecError, match="not a kvmesh layer predictor"):
        LayerPredictor.load(other)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format=np.array("kvmesh-layer-predictor-1"), key_weights=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CodecError, match="cannot read"):
        LayerPredictor.load(pickled)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(CodecError, match="cannot read"):
        LayerPredictor.load(tmp_path / "junk.npz")


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(key_weights=a["key_weights"][:, :10]), "key weights"),
    (lambda a: a.update(value_bias=a["value_bias"][:1]), "disagree"),
    (lambda a: a["key_bias"].__setitem__((0, 0), np.nan), "finite"),
])
def test_invalid_predictors_are_rejected(change, message) -> None:
    p = random_predictor()
    arrays = {n: getattr(p, n).copy() for n in ("key_weights", "key_bias", "value_weights", "value_bias")}
    change(arrays)
    with pytest.raises(CodecError, match=message):
        LayerPredictor(**arrays)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_residual_levels_follow_the_range_and_keep_parity(mode: int) -> None:
    g = torch.Generator().manual_seed(mode)
    x = torch.randn(1, 50, 16, generator=g) * 4
    assert residual_levels(21, x, x, mode) == 21 and residual_levels(7, x, x, mode) == 7
    assert residual_levels(21, x, x / 2, mode) == 11 and residual_levels(7, x, x / 3, mode) == 3
    assert residual_levels(7, x, x / 100, mode) == 3 and residual_levels(20, x, x / 100, mode) == 2
    assert residual_levels(64, x, x * 100, mode) == 256 and residual_levels(65, x, x * 100, mode) == 255
    assert residual_levels(7, torch.zeros_like(x), x, mode) == 7  # nothing to scale by: unchanged


# -- the arithmetic ----------------------------------------------------------------------------------

@pytest.mark.parametrize("narrow", [False, True], ids=["widest", "narrow"])
@pytest.mark.parametrize("rows, features, channels", [(1, 2, 1), (7, 48, 24), (13, 40, 56), (17, 33, 200), (255, 384, 192), (0, 3, 5)])
def test_compiled_prediction_equals_the_reference(rows: int, features: int, channels: int, narrow: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Both builds of predict.c (AVX-512 blocks where the CPU has them; RANSC_NO_AVX512=1 forces the
    8-lane build) give the reference's bits, row and column tails included."""
    if narrow:
        monkeypatch.setenv("RANSC_NO_AVX512", "1")
    g = torch.Generator().manual_seed(rows + features)
    x = torch.randn(rows, features, generator=g) * 10
    w = (torch.randn(features, channels, generator=g) / 5).numpy()
    b = torch.randn(channels, generator=g).numpy()
    b[0] = -0.0
    got = native.predict(x, w, b)
    want = predict_reference(x, torch.from_numpy(w), torch.from_numpy(b))
    assert torch.equal(bits(got), bits(want))
    # and not what an unordered or fused matmul gives: the order is part of the format
    if rows and features > 100:
        assert not torch.equal(got, x @ torch.from_numpy(w) + torch.from_numpy(b))


# -- containers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["cachegen", "cachegen-hq", "cachegen-compact"])
def test_round_trip_is_as_close_as_without_prediction(level: str) -> None:
    kv = related_kv()
    p = fit([kv], level=level.removeprefix("cachegen-") if "-" in level else "default")
    plain = get_codec(level, backend="cpu")
    pred = get_codec(level, backend="cpu", predictor=p)
    a, b = plain.encode(kv), pred.encode(kv)
    ya, yb = plain.decode(a), pred.decode(b)
    assert yb.shape == kv.shape and yb.dtype == kv.dtype
    ea = (ya.float() - kv.float()).norm() / kv.float().norm()
    eb = (yb.float() - kv.float()).norm() / kv.float().norm()
    assert eb < 1.6 * ea, (float(ea), float(eb))
    assert len(b) < 0.9 * len(a), (len(a), len(b))  # related layers: the residuals are cheaper
    assert torch.equal(yb[:, :, 0], plain.decode(a)[:, :, 0])  # the lead token is never predicted


@pytest.mark.parametrize("level", ["cachegen", "cachegen-hq"])
@pytest.mark.parametrize("shape", [(3, 40, 24), (3, 300, 24), (3, 1, 24), (3, 2, 5)])
def test_compiled_and_numpy_coders_write_the_same_bytes(level: str, shape: tuple[int, int, int]) -> None:
    L, T, C = shape
    p = random_predictor(L, C)
    kv = kv_like(L, T, C, seed=T)
    lv = LEVELS["hq" if level.endswith("hq") else "default"]
    fast = CacheGenCodec(lv, CpuBackend(), predictor=p)
    slow = CacheGenCodec(lv, ReferenceBackend(), predictor=p)
    blob = fast.encode(kv)
    assert slow.encode(kv) == blob
    assert torch.equal(bits(fast.decode(blob)), bits(slow.decode(blob)))
    assert len(blob) <= fast.max_encoded_size(tuple(kv.shape), kv.dtype)
    assert len(blob) <= max_encoded_size(level, tuple(kv.shape), kv.dtype, predictor=p)


def test_protected_rows_are_restored_before_the_next_layer_is_predicted() -> None:
    """Sink-like value rows (the default level protects them) come back at 8 bits, as without prediction."""
    kv = related_kv(tokens=64).float()
    kv[1, :, 10] *= 0.05  # a sink-like token in every layer
    kv = kv.to(torch.float16)
    p = fit([kv])
    plain, pred = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="cpu", predictor=p)
    assert torch.equal(pred.decode(pred.encode(kv))[1, :, 10], plain.decode(plain.encode(kv))[1, :, 10])


def test_decoding_needs_the_same_predictor() -> None:
    kv = kv_like(3, 40, 24)
    p = random_predictor()
    blob = get_codec("cachegen", backend="cpu", predictor=p).encode(kv)
    with pytest.raises(CodecError, match="predictor="):
        get_codec("cachegen", backend="cpu").decode(blob)
    with pytest.raises(CodecError, match="predictor="):
        registry_decode(blob)
    assert registry_decode(blob, predictor=p).shape == kv.shape
    with pytest.raises(CodecError, match=p.ident.hex()):
        get_codec("cachegen", backend="cpu", predictor=random_predictor(seed=5)).decode(blob)
    # a codec holding a predictor still reads containers written without one
    plain = get_codec("cachegen", backend="cpu").encode(kv)
    assert torch.equal(get_codec("cachegen", backend="cpu", predictor=p).decode(plain),
                       get_codec("cachegen", backend="cpu").decode(plain))


def test_forged_predictor_sections_are_rejected() -> None:
    kv = kv_like(3, 40, 24)
    p = random_predictor()
    codec = get_codec("cachegen-hq", backend="cpu", predictor=p)
    header, sections = container.unpack(codec.encode(kv))
    forge = (lambda secs: container.pack(header.codec_id, header.level_id, header.dtype, header.shape,
                                         [bytes(s) for s in secs]))
    with pytest.raises(CodecError, match="predictor section"):
        codec.decode(forge(sections[:8] + [bytes(sections[8]) + b"x"]))
    flags = bytearray(sections[8])
    flags[8] = 1  # layer 0 of K: never predicted
    with pytest.raises(CodecError, match="flags"):
        codec.decode(forge(sections[:8] + [bytes(flags)]))
    flags[8], flags[9] = 0, 3  # 1: fp32 prediction, 2: fixed-point; nothing else
    with pytest.raises(CodecError, match="flags"):
        codec.decode(forge(sections[:8] + [bytes(flags)]))
    # at a level that protects nothing, section 7 must be empty
    bare = CacheGenCodec(dataclasses.replace(LEVELS["hq"], protect=(0.0, 0.0)), predictor=p)
    header, sections = container.unpack(bare.encode(kv))
    assert len(sections[7]) == 0
    with pytest.raises(CodecError, match="protects none"):
        bare.decode(forge(sections[:7] + [b"\x01"] + sections[8:]))


def test_a_useless_predictor_costs_nothing_but_its_section() -> None:
    """Where the prediction would not shrink a layer's range, the writer codes the layer itself."""
    kv = kv_like(3, 40, 24)
    C = 24
    useless = LayerPredictor(np.zeros((2, 2 * C, C)), np.full((2, C), 50.0), np.zeros((2, 3 * C, C)), np.full((2, C), 50.0))
    plain = get_codec("cachegen", backend="cpu")
    blob = get_codec("cachegen", backend="cpu", predictor=useless).encode(kv)
    assert blob[-4 - 8 - 6:-4] == useless.ident + bytes(6)  # no layer predicted
    assert len(blob) == len(plain.encode(kv)) + 4 + 8 + 6  # one more section length (9, not 8), the id, the flags
    assert torch.equal(get_codec("cachegen", backend="cpu", predictor=useless).decode(blob), plain.decode(plain.encode(kv)))


def test_a_predictor_for_another_model_is_a_clear_error(tmp_path) -> None:
    p = random_predictor(layers=3, channels=24)
    with pytest.raises(CodecError, match="3 layers x 24 channels"):
        get_codec("cachegen", backend="cpu", predictor=p).encode(kv_like(4, 40, 24))
    with pytest.raises(CodecError, match="LayerPredictor or a file path"):
        get_codec("cachegen", backend="cpu", predictor=42)
    path = p.save(tmp_path / "p.npz")
    assert get_codec("cachegen", backend="cpu", predictor=str(path)).predictor.ident == p.ident
    with pytest.raises(CodecError, match="takes no option 'predictor'"):
        get_codec("int8", predictor=p)


# -- fixed-point prediction (written since 2026-12-03) -------------------------------------------------

BUILDS = {"widest": {}, "avx2": {"RANSC_NO_AVX512": "1"}, "portable": {"RANSC_NO_AVX2": "1"}}


def _builds(monkeypatch: pytest.MonkeyPatch, build: str) -> None:
    for name, value in BUILDS[build].items():
        monkeypatch.setenv(name, value)


def awkward_layer(rows: int, width: int, seed: int, magnitude: float) -> np.ndarray:
    """A decoded layer with the values that test a rounding: ties at +-x.5 after scaling, -0.0, zeros."""
    g = np.random.default_rng(seed)
    y = (g.standard_normal((rows, width)) * magnitude).astype(np.float32)
    if y.size:
        top = np.abs(y).max()
        step = np.float32(2.0 ** (-predict_mod.fixed_exponent(float(top))))
        y.flat[: y.size // 4] = ((g.integers(-1000, 1000, y.size // 4) + 0.5) * step).astype(np.float32)  # ties
        y.flat[-1] = -0.0
    return y


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 3e-3, 1.0, 40.0, 6e4])
@pytest.mark.parametrize("rows, width", [(0, 4), (1, 1), (7, 5), (13, 24), (300, 40)])
def test_fixed_point_features_equal_the_reference(rows: int, width: int, magnitude: float, build: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """to_fixed: the compiled builds, the torch form (every device's) and the numpy reference agree on
    the scale and every int16, ties and the clamp at +-32767 included; the padding column is zero."""
    _builds(monkeypatch, build)
    y = awkward_layer(rows, width, seed=rows + width, magnitude=magnitude)
    want, want_sx = to_fixed_reference(y)
    out = np.full((rows, native.even(width)), 7, np.int16)
    assert native.to_fixed(y, out) == want_sx
    assert np.array_equal(out[:, :width], want) and not out[:, width:].any()
    got, sx = predict_mod.to_fixed(torch.from_numpy(y))
    assert sx == want_sx and np.array_equal(got.numpy(), want)
    if rows and magnitude:
        assert np.abs(want).max() >= 16384 or want_sx == predict_mod.SX_MAX  # the scale uses the int16 range


def test_fixed_point_features_clamp_outside_the_scale_range() -> None:
    y = np.array([[1e30, -1e30, 1.0, 0.0]], np.float32)  # sx = SX_MIN: the large values clamp
    x, sx = to_fixed_reference(y)
    assert sx == predict_mod.SX_MIN and x.tolist() == [[32767, -32767, 0, 0]]
    out = np.empty((1, 4), np.int16)
    assert native.to_fixed(y, out) == sx and np.array_equal(out, x)


def test_fixed_weights_are_the_finest_that_cannot_overflow() -> None:
    p = random_predictor(layers=3, channels=24, seed=4, scale=0.3)
    w, b = p.weights(1, 2)
    w = w.copy()
    w[:, 0] = 0.0  # an all-zero column: the largest exponent
    w[30, 1] = 3000.0  # one large weight: bounded by |W| <= W_MAX, not by the sum
    w16, sw = predict_mod.fixed_weights(w, 24)
    assert sw.shape == (3, 24) and w16.shape == w.shape and w16.dtype == np.int16
    assert (sw[:, 0] == predict_mod.SW_MAX).all() and not w16[:, 0].any()
    parts = w.astype(np.float64).reshape(3, 24, 24)
    for shift in (0, 1):  # at sw the bounds hold; at sw + 1 they fail (unless sw is already the largest)
        s = sw.astype(np.int64) + shift
        q = np.floor(parts * np.ldexp(1.0, s)[:, None, :] + 0.5)
        ok = (np.abs(q).max(axis=1) <= predict_mod.W_MAX) & (np.abs(q).sum(axis=1) <= predict_mod.W_L1_MAX)
        if shift == 0:
            assert ok.all() and np.array_equal(q.reshape(72, 24), w16)
        else:
            assert not ok[sw < predict_mod.SW_MAX].any()
    assert 16384 <= np.abs(w16[24:48, 1]).max() <= 32767  # the large weight sets its column's scale
    with pytest.raises(CodecError, match="too large for fixed-point"):
        predict_mod.fixed_weights(np.full((24, 24), 1e12, np.float32), 24)


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("kv", [0, 1])
@pytest.mark.parametrize("rows, channels", [(0, 6), (1, 1), (7, 24), (13, 5), (19, 40), (255, 72), (6, 192)])
def test_compiled_fixed_prediction_equals_the_reference(rows: int, channels: int, kv: int, build: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every build of predict_fixed (AVX512-VNNI 6 x 64 blocks, AVX2 4 x 16, portable; row and column
    tails, odd widths) gives the numpy reference's bits, into out and added to it."""
    _builds(monkeypatch, build)
    p = random_predictor(layers=2, channels=channels, seed=channels + rows)
    layers = [awkward_layer(rows, channels, seed=i, magnitude=m) for i, m in enumerate((30.0, 0.7, 4.0))]
    parts = [to_fixed_reference(y) for y in layers][:2 + kv]
    w16, sw = p.fixed(kv, 1)
    want = predict_fixed_reference(parts, w16, sw, p.weights(kv, 1)[1])
    padded = []
    for x, sx in parts:
        xp = np.zeros((rows, native.even(channels)), np.int16)
        xp[:, :channels] = x
        padded.append((xp, sx))
    out = np.empty((rows, channels), np.float32)
    native.predict_fixed(tuple(padded), p, kv, 1, out)
    assert np.array_equal(out.view(np.int32), want.view(np.int32))
    base = np.random.default_rng(1).standard_normal((rows, channels)).astype(np.float32)
    acc = base.copy()
    native.predict_fixed(tuple(padded), p, kv, 1, acc, add=True)
    assert np.array_equal(acc.view(np.int32), (base + want).view(np.int32))
    if rows > 5 and channels > 20:  # and close to the fp32 prediction: the weights keep ~1e-4 of their size
        x = np.concatenate(layers[:2 + kv], axis=1)
        w, b = p.weights(kv, 1)
        exact = x.astype(np.float64) @ w + b
        assert np.abs(want - exact).max() < 2e-3 * np.abs(exact).max()


@pytest.mark.parametrize("build", list(BUILDS))
def test_fixed_point_containers_are_the_same_on_every_build(build: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _builds(monkeypatch, build)
    kv = related_kv(layers=3, tokens=70, channels=24, seed=3)
    p = fit([kv])
    fast = CacheGenCodec(LEVELS["default"], CpuBackend(), predictor=p)
    slow = CacheGenCodec(LEVELS["default"], ReferenceBackend(), predictor=p)
    blob = fast.encode(kv)
    assert blob == slow.encode(kv)
    assert torch.equal(bits(fast.decode(blob)), bits(slow.decode(blob)))


def test_fixed_point_prediction_is_as_good_as_fp32() -> None:
    """The same choices, sizes and errors as the fp32 arithmetic, within a fraction of a percent."""
    kv = related_kv(layers=4, tokens=200, channels=24, seed=9)
    p = fit([kv])
    out = {}
    for fixed in (True, False):
        codec = CacheGenCodec(LEVELS["default"], CpuBackend(), predictor=p, fixed_prediction=fixed)
        blob = codec.encode(kv)
        err = float((codec.decode(blob).float() - kv.float()).norm() / kv.float().norm())
        used = bytes(container.unpack(blob)[1][8])[8:]
        out[fixed] = (len(blob), err, used)
    (n_fixed, e_fixed, u_fixed), (n_fp32, e_fp32, u_fp32) = out[True], out[False]
    assert set(u_fixed) <= {0, 2} and set(u_fp32) <= {0, 1} and [bool(u) for u in u_fixed] == [bool(u) for u in u_fp32]
    assert abs(n_fixed - n_fp32) < 0.01 * n_fp32 and abs(e_fixed - e_fp32) < 0.01 * e_fp32, out


FIXTURE = Path(__file__).parent / "data"


def test_containers_with_fp32_prediction_still_read() -> None:
    """A container written before fixed-point prediction (by commit 6a46fd1, flags 1) decodes to the
    values it always did, on the fused and the stage-by-stage decoder; and fixed_prediction=False writes
    exactly those bytes again (once its coded sections 1-4 are put back in the zlib form of that time)."""
    import hashlib

    blob = (FIXTURE / "fp32_predicted.kvmc").read_bytes()
    p = LayerPredictor.load(FIXTURE / "fp32_predicted.predictor.npz")
    assert set(bytes(container.unpack(blob)[1][8])[8:]) == {0, 1}
    fused = CacheGenCodec(LEVELS["default"], CpuBackend(), predictor=p)
    y = fused.decode(blob)
    assert hashlib.sha256(y.numpy().tobytes()).hexdigest() == \
        "fb7b38f7de7ebb7ec994d10a83c4647bd04158e21423eba3f2b95ddadc36d076"
    assert torch.equal(bits(y), bits(CacheGenCodec(LEVELS["default"], ReferenceBackend(), predictor=p).decode(blob)))
    kv = related_kv(layers=3, tokens=40, channels=24, seed=7)
    assert zlib_form(CacheGenCodec(LEVELS["default"], CpuBackend(), predictor=p, fixed_prediction=False).encode(kv)) == blob
    assert fused.encode(kv) != blob  # new containers: fixed-point


def test_each_predicted_layer_follows_its_own_flag() -> None:
    """A reader takes the arithmetic per (K/V, layer) from section 8: a container whose flags mix 1 and
    2 decodes the same on the fused and the stage-by-stage decoder (and differently from all-2)."""
    kv = related_kv(layers=3, tokens=70, channels=24, seed=5)
    p = fit([kv])
    codec = CacheGenCodec(LEVELS["default"], CpuBackend(), predictor=p)
    blob = codec.encode(kv)
    header, sections = container.unpack(blob)
    flags = bytearray(sections[8])
    assert flags[8:].count(2) >= 2, flags
    flags[flags.index(2, 8)] = 1
    mixed = container.pack(header.codec_id, header.level_id, header.dtype, header.shape,
                           [bytes(s) for s in sections[:8]] + [bytes(flags)])
    got = codec.decode(mixed)
    assert torch.equal(bits(got), bits(CacheGenCodec(LEVELS["default"], ReferenceBackend(), predictor=p).decode(mixed)))
    assert not torch.equal(got, codec.decode(blob))
