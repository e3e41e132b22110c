"""`cachegen` protected rows: sink-like value rows stored again at 8 bits (codec.py, FORMAT.md §2).

A row (K/V, layer, token) whose median |x| is far below the chunk's usual one is attention-sink-like;
the default level stores such value rows in section 7 and they replace what the streams decoded.
"""
from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError, container, get_codec
from kvmesh.codecs.cachegen.codec import N_SECTIONS, CacheGenCodec, protected_bytes, protected_rows
from kvmesh.codecs.cachegen.levels import LEVELS

from .conftest import kv_like

SINK = (1, 5)  # (layer, token) of the planted sink-like value row


def planted(dtype: torch.dtype = torch.float32, tokens: int = 40) -> torch.Tensor:
    """A chunk with one value row at 2% of its usual magnitude (a ' the'-like sink token)."""
    kv = kv_like(3, tokens, 24, dtype=torch.float32, seed=11)
    kv[1, SINK[0], SINK[1]] *= 0.02
    return kv.to(dtype)


def sections_of(blob: bytes) -> list[bytes]:
    return [bytes(s) for s in container.unpack(blob)[1]]


def repack(blob: bytes, sections: list[bytes]) -> bytes:
    header, _ = container.unpack(blob)
    return container.pack(header.codec_id, header.level_id, header.dtype, header.shape, sections)


def test_every_level_protects_values_only():
    for level in LEVELS.values():
        assert level.protects and level.protect[0] == 0.0 and level.protect[1] > 0, level.name


def test_selection_picks_the_sink_like_row():
    kv = planted()
    mask = protected_rows(kv[:, :, 1:].float(), LEVELS["default"].protect)
    assert mask.shape == (2, 3, 39)
    assert not mask[0].any(), "keys are not protected at the default level"
    assert mask[1, SINK[0], SINK[1] - 1], "the planted row (rest token SINK-1) must be selected"
    assert int(mask.sum()) <= 3, "ordinary rows of random data are not sink-like"


def test_protected_row_decodes_at_8_bits():
    kv = planted()
    codec = get_codec("cachegen", backend="cpu")
    blob = codec.encode(kv)
    secs = sections_of(blob)
    assert len(secs) == N_SECTIONS + 1
    n = int(protected_rows(kv[:, :, 1:].float(), LEVELS["default"].protect).sum())
    assert len(secs[7]) == protected_bytes(3, 39, 24, n)
    out = codec.decode(blob)
    row, ref = out[1, SINK[0], SINK[1]].double(), kv[1, SINK[0], SINK[1]].double()
    span = float(ref.max() - ref.min())
    # 8-bit per-token: half a step of the row's own range (+ fp16 widening of its bounds)
    assert float((row - ref).abs().max()) <= span / 255 / 2 * 1.01 + 1e-7
    # without protection the same row would be coded with the layer's 7 levels over its own scale,
    # an error of up to its max |v| / 6: make sure the test can tell the two apart
    assert span / 255 / 2 < float(ref.abs().max()) / 6 / 4


def test_protection_never_changes_unprotected_rows():
    kv = planted()
    plain = CacheGenCodec(dataclasses.replace(LEVELS["default"], protect=(0.0, 0.0)))
    a = plain.decode(plain.encode(kv))
    b = get_codec("cachegen", backend="cpu").decode(get_codec("cachegen", backend="cpu").encode(kv))
    mask = torch.zeros(kv.shape[:3], dtype=torch.bool)
    mask[:, :, 1:] = protected_rows(kv[:, :, 1:].float(), LEVELS["default"].protect)
    assert torch.equal(a[~mask], b[~mask])
    assert not torch.equal(a[mask], b[mask])


def test_containers_from_before_protection_still_decode():
    """A default-level container with 7 sections (written before section 7 existed) decodes."""
    kv = planted(torch.float16)
    old_level = dataclasses.replace(LEVELS["default"], protect=(0.0, 0.0))
    old_blob = CacheGenCodec(old_level).encode(kv)
    assert len(sections_of(old_blob)) == N_SECTIONS
    out = get_codec("cachegen", backend="cpu").decode(old_blob)
    assert torch.equal(out, CacheGenCodec(old_level).decode(old_blob))


@pytest.mark.parametrize("tokens", [1, 2, 257])
def test_edge_token_counts_round_trip(tokens):
    kv = kv_like(2, tokens, 5, dtype=torch.float16, seed=tokens)
    codec = get_codec("cachegen", backend="cpu")
    blob = codec.encode(kv)
    assert len(blob) <= codec.max_encoded_size(tuple(kv.shape), kv.dtype)
    out = codec.decode(blob)
    assert out.shape == kv.shape and torch.isfinite(out).all()


def test_max_size_holds_when_every_row_is_protected():
    """Rows of zeros: every median is 0, nothing is below 0.35 x 0 — then scale all but one row up."""
    kv = kv_like(2, 30, 8, dtype=torch.float32, seed=5)
    kv[1, :, 1:] *= 1e-3
    kv[1, :, 1:16] *= 1e3  # half the rows ordinary, half at 1e-3 of them: those are protected
    codec = get_codec("cachegen", backend="cpu")
    blob = codec.encode(kv)
    assert len(sections_of(blob)[7]) > protected_bytes(2, 29, 8, 0)
    assert len(blob) <= codec.max_encoded_size(tuple(kv.shape), kv.dtype)


def _corrupt(mutate) -> bytes:
    blob = get_codec("cachegen", backend="cpu").encode(planted())
    secs = sections_of(blob)
    secs[7] = mutate(secs[7])
    return repack(blob, secs)


@pytest.mark.parametrize("mutate, why", [
    (lambda s: s[:-1], "wrong size"),
    (lambda s: s + b"\x00", "wrong size"),
    (lambda s: s[: (2 * 3 * 39 + 7) // 8 - 1], "shorter than its mask"),
    (lambda s: bytes([s[0] ^ 0x01]) + s[1:], "wrong size"),  # one more or one fewer row than stored
    (lambda s: s[:29] + bytes([s[29] | 0x80]) + s[30:], "padding bits"),  # bit 234 of 2*3*39 = 234 bits
])
def test_corrupt_protected_section_raises(mutate, why):
    with pytest.raises(CodecError, match=why):
        get_codec("cachegen", backend="cpu").decode(_corrupt(mutate))


def test_non_finite_protected_bounds_raise():
    blob = get_codec("cachegen", backend="cpu").encode(planted())
    secs = sections_of(blob)
    nmask = (2 * 3 * 39 + 7) // 8
    sec = bytearray(secs[7])
    sec[nmask:nmask + 2] = struct.pack("<e", float("inf"))
    secs[7] = bytes(sec)
    with pytest.raises(CodecError, match="non-finite"):
        get_codec("cachegen", backend="cpu").decode(repack(blob, secs))


def test_section_7_on_a_level_without_protection_is_rejected():
    kv = planted()
    bare = CacheGenCodec(dataclasses.replace(LEVELS["hq"], protect=(0.0, 0.0)))
    blob = bare.encode(kv)
    assert len(sections_of(blob)) == N_SECTIONS
    forged = repack(blob, sections_of(blob) + [b"\x00" * 8])
    with pytest.raises(CodecError, match="sections"):
        bare.decode(forged)


def test_crc_still_guards_section_7():
    blob = bytearray(get_codec("cachegen", backend="cpu").encode(planted()))
    blob[-10] ^= 0x40  # inside section 7 (the last one), CRC left stale
    assert zlib.crc32(bytes(blob[:-4])) != struct.unpack("<I", bytes(blob[-4:]))[0]
    with pytest.raises(CodecError):
        get_codec("cachegen", backend="cpu").decode(bytes(blob))


def test_selection_is_the_documented_rule():
    """sum over channels of fp16(|x|) in float64, then rows below threshold x the lower median over tokens."""
    x = torch.tensor(np.random.default_rng(0).standard_normal((2, 2, 10, 6)), dtype=torch.float32)
    x[1, 0, 4] *= 0.1
    got = protected_rows(x, (0.0, 0.35))
    s = np.abs(x.numpy()).astype(np.float16).astype(np.float64).sum(axis=3)
    ref = np.sort(s, axis=2)[..., (10 - 1) // 2][..., None]  # the lower of the two middle values
    want = s < np.array([0.0, 0.35]).reshape(2, 1, 1) * ref
    assert np.array_equal(got.numpy(), want)
    assert got[1, 0, 4] and not got[0].any()


def test_selection_statistic_is_order_independent():
    """The float64 sum of fp16 magnitudes is exact: summing the channels in reverse gives the same bits."""
    x = kv_like(2, 64, 192, dtype=torch.float32, seed=9) * 1000
    s = torch.abs(x[1]).to(torch.float16).to(torch.float64)
    assert torch.equal(s.sum(dim=2), s.flip(2).sum(dim=2))
    assert torch.equal(s.sum(dim=2), s.cumsum(dim=2)[..., -1])
