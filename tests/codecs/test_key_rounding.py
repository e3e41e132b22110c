"""Query-aware key rounding (codecs/cachegen/rounding.py): the profile, the rounding, and the codec with it.

The rounding is an encoder choice: the container format and the decoder do not change. What is checked:
- profiles are validated, saved and loaded without pickles;
- the torch reference, the compiled coder and (interpreted) Triton choose the same symbols / bytes;
- with an identity profile nothing is fed back, so the symbols are plain rounding's;
- with a correlated profile the query-weighted key error falls well below plain rounding's, on random
  and on real KV (the profile measured on the real model in tests/engine/test_query_profile.py);
- any decoder reads the containers; a profile for another model is a clear CodecError.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError, QueryProfile, get_codec, method_options
from kvmesh.codecs.cachegen import native, quant, rounding
from kvmesh.codecs.cachegen.backends import CpuBackend
from kvmesh.codecs.cachegen.codec import CacheGenCodec
from kvmesh.codecs.cachegen.levels import LEVELS
from tests.codecs.reference.backend import ReferenceBackend
from tests.codecs.reference.rounding import quantize_keys as reference_quantize_keys


def correlated_moments(layers: int, heads: int, dim: int, seed: int = 0) -> np.ndarray:
    """SPD matrices with a few dominant directions (queries concentrate like real ones do)."""
    g = np.random.default_rng(seed)
    a = g.standard_normal((layers, heads, dim, 3)) * 4.0
    b = g.standard_normal((layers, heads, dim, dim)) * 0.3
    return a @ np.swapaxes(a, 2, 3) + b @ np.swapaxes(b, 2, 3) + 0.05 * np.eye(dim)


def weighted_error(x: torch.Tensor, y: torch.Tensor, moments: np.ndarray) -> float:
    """sum over tokens of dk^T H dk, per (layer, head): what the queries see of key errors x - y [L, T, C]."""
    L, T, C = x.shape
    H, D = moments.shape[1], moments.shape[2]
    d = (y - x).double().reshape(L, T, H, D)
    return float(torch.einsum("ltha,lhab,lthb->", d, torch.from_numpy(moments), d))


def keys_like(layers: int, tokens: int, channels: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(layers, 1, channels, generator=g) * 3 + 0.1
    return torch.randn(layers, tokens, channels, generator=g) * scale


def round_both(x: torch.Tensor, profile: QueryProfile, levels: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """(symbols of plain rounding, symbols rounded along the profile), mode 3."""
    lv = torch.full((x.shape[0],), float(levels))
    q0, side = quant.quantize(x, lv, quant.MODE_CHANNEL_SHARED_STEP)
    q1 = reference_quantize_keys(x, side, lv, quant.MODE_CHANNEL_SHARED_STEP, profile)
    return q0, q1


# -- the profile ----------------------------------------------------------------------------------

@pytest.mark.parametrize("moments, message", [
    (np.ones((2, 3, 4)), "shape"),
    (np.full((1, 1, 2, 2), np.nan), "finite"),
    (np.array([[[[1.0, 2.0], [0.0, 1.0]]]]), "symmetric"),
    (np.array([[[[-1.0, 0.0], [0.0, -1.0]]]]), "positive"),
    (np.array([[[[1.0, 5.0], [5.0, 1.0]]]]), "semi-definite"),
])
def test_invalid_moments_are_rejected(moments: np.ndarray, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        QueryProfile(moments)


def test_damp_must_be_a_fraction() -> None:
    with pytest.raises(CodecError, match="damp"):
        QueryProfile(correlated_moments(1, 1, 4), damp=0.0)


def test_profile_factors_invert_the_damped_moments() -> None:
    m = correlated_moments(2, 2, 8)
    p = QueryProfile(m)
    for l in range(2):
        for h in range(2):
            o = p.order[l, h]
            damped = m[l, h] + p.damp * np.diag(m[l, h]).mean() * np.eye(8)
            u = p.factor[l, h].astype(np.float64)
            assert np.allclose(np.triu(u), u)  # upper triangular
            assert np.allclose(u.T @ u, np.linalg.inv(damped[np.ix_(o, o)]), rtol=1e-4, atol=1e-7)
            assert list(np.diag(m[l, h])[o]) == sorted(np.diag(m[l, h]), reverse=True)


def test_save_and_load_round_trip(tmp_path) -> None:
    p = QueryProfile(correlated_moments(2, 3, 8), damp=0.02)
    path = p.save(tmp_path / "sub" / "p.npz")
    q = QueryProfile.load(path)
    assert q.fingerprint() == p.fingerprint() and q.damp == 0.02
    assert np.array_equal(q.factor, p.factor) and np.array_equal(q.order, p.order)
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_load_rejects_foreign_and_pickled_files(tmp_path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(CodecError, match="cannot read"):
        QueryProfile.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", moments=np.eye(2)[None, None])
    with pytest.raises(CodecError, match="not a kvmesh query profile"):
        QueryProfile.load(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", format=np.array("kvmesh-query-profile-1"),
             moments=np.array([{"a": 1}], dtype=object), damp=np.array(0.01))
    with pytest.raises(CodecError, match="cannot read"):
        QueryProfile.load(tmp_path / "pickled.npz")
    with pytest.raises(CodecError, match="cannot read"):
        QueryProfile.load(tmp_path / "missing.npz")


# -- the rounding -----------------------------------------------------------------------------------

def test_identity_profile_feeds_nothing_back() -> None:
    x = keys_like(2, 40, 24)
    eye = np.broadcast_to(np.eye(8), (2, 3, 8, 8)).copy()
    q0, q1 = round_both(x, QueryProfile(eye))
    assert torch.equal(q0, q1)


def test_rounding_lowers_the_query_weighted_error() -> None:
    L, T, H, D = 2, 300, 2, 16
    m = correlated_moments(L, H, D)
    x = keys_like(L, T, H * D)
    q0, q1 = round_both(x, QueryProfile(m))
    lv = torch.full((L,), 12.0)
    _, side = quant.quantize(x, lv, quant.MODE_CHANNEL_SHARED_STEP)
    y0 = quant.dequantize(q0, side, lv, quant.MODE_CHANNEL_SHARED_STEP)
    y1 = quant.dequantize(q1, side, lv, quant.MODE_CHANNEL_SHARED_STEP)
    e0, e1 = weighted_error(x, y0, m), weighted_error(x, y1, m)
    assert e1 < 0.6 * e0, (e0, e1)
    # plain MSE rises (the error moves to directions the queries do not read), symbols stay on the grid
    assert float((y1 - x).pow(2).sum()) > float((y0 - x).pow(2).sum())
    assert int(q1.max()) <= 11


@pytest.mark.parametrize("layers, tokens, heads, dim", [(1, 1, 1, 4), (2, 33, 3, 8), (3, 300, 2, 16), (2, 513, 1, 64)])
def test_compiled_rounding_equals_the_reference(layers: int, tokens: int, heads: int, dim: int) -> None:
    p = QueryProfile(correlated_moments(layers, heads, dim, seed=tokens))
    x = keys_like(layers, tokens, heads * dim, seed=tokens)
    lv = torch.full((layers,), 20.0)
    for mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP):
        _, side = quant.quantize(x, lv, mode)
        ref = reference_quantize_keys(x, side, lv, mode, p)
        got = native.round_keys(x.contiguous(), *quant.grid(side, lv, mode), p)
        assert torch.equal(ref, got)


def test_rounding_needs_a_channel_mode() -> None:
    x = keys_like(1, 8, 8)
    lv = torch.full((1,), 9.0)
    _, side = quant.quantize(x, lv, quant.MODE_TOKEN_SYMMETRIC)
    with pytest.raises(CodecError, match="per-channel key mode"):
        reference_quantize_keys(x, side, lv, quant.MODE_TOKEN_SYMMETRIC, QueryProfile(correlated_moments(1, 1, 8)))


# -- the codec with a profile -------------------------------------------------------------------------

def kv_chunk(layers: int = 3, tokens: int = 70, channels: int = 32) -> torch.Tensor:
    return torch.stack([keys_like(layers, tokens, channels, 5), keys_like(layers, tokens, channels, 6)]).to(torch.float16)


def test_any_decoder_reads_profiled_containers_and_values_are_untouched(tmp_path) -> None:
    kv = kv_chunk()
    p = QueryProfile(correlated_moments(3, 2, 16))
    plain, profiled = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="cpu", key_profile=p.save(tmp_path / "p.npz"))
    a, b = plain.encode(kv), profiled.encode(kv)
    assert a != b
    ya, yb = plain.decode(a), plain.decode(b)
    assert torch.equal(profiled.decode(b), yb)
    assert torch.equal(ya[1], yb[1])  # values: the same symbols
    assert torch.equal(ya[:, :, 0], yb[:, :, 0])  # the lead token is stored apart at 8 bits
    x = kv.float()
    assert weighted_error(x[0], yb[0].float(), p.moments) < 0.7 * weighted_error(x[0], ya[0].float(), p.moments)


def test_profiled_bytes_equal_between_compiled_and_numpy_coders() -> None:
    kv = kv_chunk(2, 300, 48)
    p = QueryProfile(correlated_moments(2, 3, 16, seed=3))
    level = LEVELS["default"]
    blob = CacheGenCodec(level, ReferenceBackend(), p).encode(kv)
    assert CacheGenCodec(level, CpuBackend(), p).encode(kv) == blob
    assert torch.equal(get_codec("cachegen", backend="cpu").decode(blob), CacheGenCodec(level, ReferenceBackend()).decode(blob))


def test_a_profile_for_another_model_is_a_clear_error() -> None:
    codec = get_codec("cachegen", backend="cpu", key_profile=QueryProfile(correlated_moments(2, 2, 16)))
    with pytest.raises(CodecError, match="query profile is for 2 layers x 32 channels"):
        codec.encode(kv_chunk(3, 10, 32))


def test_key_profile_is_a_cachegen_option_only() -> None:
    assert method_options("cachegen") == ("key_profile", "predictor", "schedule") and "key_profile" in method_options("cachegen-hq")
    assert method_options("int8") == ()
    with pytest.raises(CodecError, match="takes no option 'key_profile'"):
        get_codec("int8", key_profile=QueryProfile(correlated_moments(1, 1, 4)))
    with pytest.raises(CodecError, match="QueryProfile or a file path"):
        get_codec("cachegen", backend="cpu", key_profile=123)
    # None means no profile: the plain codec
    assert get_codec("cachegen", backend="cpu", key_profile=None).key_profile is None
