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

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError, LayerPredictor, container, get_codec, max_encoded_size
from kvmesh.codecs import decode as registry_decode
from kvmesh.codecs.cachegen import native
from kvmesh.codecs.cachegen.backends import CpuBackend
from kvmesh.codecs.cachegen.codec import CacheGenCodec
from kvmesh.codecs.cachegen.levels import LEVELS
from kvmesh.codecs.cachegen.predict import fit, residual_levels
from tests.codecs.conftest import bits, kv_like
from tests.codecs.reference.backend import ReferenceBackend
from tests.codecs.reference.predict import predict_reference



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
