"""The whole cachegen codec on the Triton backend writes the CPU backend's bytes, and each decodes the other's.

Interpreted on a CPU-only machine (see test_triton_kernels.load_kernels), on the GPU when present.
bf16 is checked only on a GPU: Triton's interpreter gets bf16 wrong silently.
"""
from __future__ import annotations

import pytest
import torch

from kvmesh.codecs import CodecError, get_codec
from tests.codecs.conftest import bits, kv_like
from tests.codecs.test_triton_kernels import DEVICE, load_kernels

load_kernels()

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.fixture(autouse=True)
def interpret_env(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def codecs(method: str):
    return get_codec(method, backend="cpu"), get_codec(method, backend="triton")


def check_same(kv: torch.Tensor, method: str) -> bytes:
    cpu, tri = codecs(method)
    want = cpu.encode(kv)
    got = tri.encode(kv.to(DEVICE))
    assert got == want, f"{method} {tuple(kv.shape)} {kv.dtype}: Triton bytes differ from CPU bytes " \
                        f"({len(got)} vs {len(want)} bytes, first difference at byte " \
                        f"{next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))})"
    ref = cpu.decode(want)
    back = tri.decode(want)
    assert back.device.type == DEVICE.type and back.dtype == kv.dtype and back.shape == kv.shape
    assert torch.equal(bits(back.cpu()), bits(ref)), "Triton decode differs from CPU decode"
    return want


@pytest.mark.parametrize("method", ["cachegen", "cachegen-hq"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 37, 24), (3, 5, 7)])
def test_bytes_identical(method: str, shape: tuple[int, int, int]) -> None:
    for dtype in DTYPES:
        check_same(kv_like(*shape, dtype=dtype, seed=sum(shape)), method)


def test_bytes_identical_multi_segment() -> None:
    """More tokens than one 256-token segment: two segments, the second 3 tokens long."""
    check_same(kv_like(1, 259, 6, dtype=torch.float16, seed=3), "cachegen")


def test_bytes_identical_compact_level() -> None:
    check_same(kv_like(30, 40, 12, dtype=torch.float16, seed=13), "cachegen-compact")


def test_bytes_identical_with_protected_rows() -> None:
    """A sink-like value row (2% of the usual magnitude) goes to section 7 on both backends alike."""
    from kvmesh.codecs import container

    for dtype in DTYPES:
        kv = kv_like(3, 40, 24, dtype=torch.float32, seed=11)
        kv[1, 1, 5] *= 0.02
        blob = check_same(kv.to(dtype), "cachegen")
        sections = container.unpack(blob)[1]
        assert len(sections) == 8 and len(sections[7]) > (2 * 3 * 39 + 7) // 8, "no row was protected"


def test_bytes_identical_with_delta_streams() -> None:
    """Slowly drifting key channels make delta streams (bit 7 of the table byte) on both backends alike."""
    import numpy as np

    from kvmesh.codecs.cachegen.codec import stream_meta
    from kvmesh.codecs.cachegen.delta import DELTA_FLAG

    for dtype in DTYPES:
        kv = kv_like(2, 120, 8, dtype=torch.float32, seed=5)
        kv[0] = torch.cumsum(0.3 * torch.randn(2, 120, 8, generator=torch.Generator().manual_seed(5)), dim=1)
        for method in ("cachegen", "cachegen-hq"):
            blob = check_same(kv.to(dtype), method)
            meta = np.frombuffer(stream_meta(blob), np.uint8)
            assert (meta[meta.size // 2:] >= DELTA_FLAG).any(), "no delta stream was chosen"


def test_constant_and_zero_channels() -> None:
    kv = kv_like(2, 19, 10, dtype=torch.float32, seed=4)
    kv[:, :, :, 0] = 0.0
    kv[0, :, :, 3] = 1.5
    kv[1, 1] = 0.0  # an all-zero layer of V: symmetric scale 0
    check_same(kv, "cachegen")
    check_same(kv, "cachegen-hq")


def test_triton_decode_rejects_corruption() -> None:
    cpu, tri = codecs("cachegen")
    blob = bytearray(cpu.encode(kv_like(2, 21, 9, seed=5)))
    for pos in (len(blob) // 2, len(blob) - 3):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(CodecError):
            tri.decode(bytes(bad))
    with pytest.raises(CodecError):
        tri.decode(bytes(blob[:-5]))


@pytest.mark.parametrize("method", ["cachegen", "cachegen-hq"])
def test_bytes_identical_with_a_query_profile(method: str) -> None:
    """Keys rounded along a query profile (rounding.py): the device runs the same fp32 steps."""
    from kvmesh.codecs import QueryProfile
    from tests.codecs.test_key_rounding import correlated_moments

    profile = QueryProfile(correlated_moments(2, 3, 8, seed=7))
    kv = kv_like(2, 259, 24, dtype=torch.float16, seed=11)
    cpu = get_codec(method, backend="cpu", key_profile=profile)
    tri = get_codec(method, backend="triton", key_profile=profile)
    want = cpu.encode(kv)
    assert want != get_codec(method, backend="cpu").encode(kv)  # the profile changed some key symbols
    assert tri.encode(kv.to(DEVICE)) == want


@pytest.mark.parametrize("method", ["cachegen", "cachegen-hq"])
def test_bytes_identical_with_a_layer_predictor(method: str) -> None:
    """Cross-layer prediction (predict.py): the device's prediction kernel adds the products in the
    reference order, unfused, so the residuals, their level counts and the bytes are the CPU's."""
    from tests.codecs.test_layer_prediction import random_predictor

    predictor = random_predictor(layers=3, channels=24, seed=3)
    kv = kv_like(3, 70, 24, dtype=torch.float16, seed=12)
    cpu = get_codec(method, backend="cpu", predictor=predictor)
    tri = get_codec(method, backend="triton", predictor=predictor)
    want = cpu.encode(kv)
    assert want != get_codec(method, backend="cpu").encode(kv)
    assert tri.encode(kv.to(DEVICE)) == want
    assert torch.equal(bits(tri.decode(want).cpu()), bits(cpu.decode(want)))


def test_containers_with_fp32_prediction_decode_the_same_on_the_device() -> None:
    """Containers written before fixed-point prediction (section 8 flags 1) still read on the device."""
    from pathlib import Path

    from kvmesh.codecs import LayerPredictor

    data = Path(__file__).parent / "data"
    blob = (data / "fp32_predicted.kvmc").read_bytes()
    p = LayerPredictor.load(data / "fp32_predicted.predictor.npz")
    want = get_codec("cachegen", backend="cpu", predictor=p).decode(blob)
    got = get_codec("cachegen", backend="triton", predictor=p).decode(blob)
    assert torch.equal(bits(got.cpu()), bits(want))


# ---- the device pipeline (device_pipeline.py) on every container form ------------------------------

@pytest.mark.parametrize("channels", [6, 7])  # 2 and 1 channels per coded stream
def test_bytes_identical_with_small_channel_groups(channels: int) -> None:
    kv = kv_like(2, 30, channels, dtype=torch.float16, seed=channels)
    kv[1, 1, 3] *= 0.02
    check_same(kv, "cachegen")


def _repack(blob: bytes, params: bytes | None = None, sections: list[bytes] | None = None) -> bytes:
    from kvmesh.codecs import container

    header, secs = container.unpack(blob)
    parts = [bytes(s) for s in secs] if sections is None else sections
    if params is not None:
        parts[0] = params
    return container.pack(header.codec_id, header.level_id, header.dtype, header.shape, parts)


def test_device_decode_reads_every_older_container_form(monkeypatch) -> None:
    """Containers written before the coded sections 1-4 (zlib), before the variant byte, before section 7,
    before coded streams (G = 1) and with sections 1-4 raw: the device decodes each to the CPU's tensor."""
    import kvmesh.codecs.cachegen.codec as cm
    from kvmesh.codecs import container
    from tests.codecs.reference.sidecode import raw_sections, zlib_form

    cpu, tri = codecs("cachegen")
    kv = kv_like(2, 40, 8, dtype=torch.float16, seed=21)
    kv[1, 0, 5] *= 0.02
    blob = cpu.encode(kv)
    secs = container.unpack(blob)[1]
    params = bytes(secs[0])
    raw = raw_sections(blob)
    monkeypatch.setattr(cm, "channel_group", lambda channels: 1)
    g1 = cpu.encode(kv)
    monkeypatch.undo()
    old = zlib_form(blob)  # sections 1-4 as zlib streams, as every writer before 2026-12-03
    osecs = container.unpack(old)[1]
    oparams = bytes(osecs[0])
    forms = {
        "zlib sections 1-4": old,
        "no variant byte": _repack(old, oparams[:-1]),
        "no section 7": _repack(old, sections=[oparams[:-1], *map(bytes, osecs[1:7])]),
        "G = 1": g1,
        "sections 1-4 raw": _repack(blob, sections=[params, *raw, *map(bytes, secs[5:])]),
    }
    for name, old in forms.items():
        want = cpu.decode(old)
        got = tri.decode(old)
        assert torch.equal(bits(got.cpu()), bits(want)), name
