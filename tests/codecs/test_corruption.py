"""Every method: corrupt, truncated, random and foreign containers raise CodecError, never a tensor
or another exception; the max-size function bounds real outputs (dietgpu style)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import kvmesh.codecs as codecs
from kvmesh.codecs import CodecError, container, get_codec

from .conftest import kv_like
from .reference.sidecode import raw_sections, zlib_form

METHODS = ["cachegen", "cachegen-hq", "lossless", "int8", "int4", "fp8", "lmcache-cachegen"]


@pytest.fixture(scope="module")
def blobs() -> dict[str, tuple[torch.Tensor, bytes]]:
    kv = kv_like(2, 260, 12, dtype=torch.float16, seed=3)
    return {m: (kv, get_codec(m).encode(kv)) for m in METHODS}


def _section_offsets(blob: bytes) -> list[tuple[int, int]]:
    header = container.read_header(blob)
    pos = container.FIXED_HEADER_BYTES + 4 * len(header.section_lengths)
    spans = [(0, pos)]
    for n in header.section_lengths:
        spans.append((pos, n))
        pos += n
    spans.append((pos, 4))
    return spans


def _refresh_crc(b: bytearray) -> bytes:
    b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])))
    return bytes(b)


@pytest.mark.parametrize("method", METHODS)
def test_bit_flips_in_every_section_raise(blobs, method):
    _, blob = blobs[method]
    codec = get_codec(method)
    for start, n in _section_offsets(blob):
        for off in {start, start + n // 2, start + max(n - 1, 0)}:
            if n == 0:
                continue
            for bit in (0, 7):
                b = bytearray(blob)
                b[off] ^= 1 << bit
                with pytest.raises(CodecError):
                    codec.decode(bytes(b))


@pytest.mark.parametrize("method", METHODS)
def test_flips_behind_a_valid_checksum_never_crash(blobs, method):
    """Corruption the CRC cannot see (a forged checksum): structural and rANS checks catch what they
    can; what they cannot catch must still decode to a tensor of the right shape, never crash."""
    kv, blob = blobs[method]
    codec = get_codec(method)
    caught = 0
    for i, (start, n) in enumerate(_section_offsets(blob)[:-1]):
        for off in range(start, start + n, max(1, n // 5)):
            b = bytearray(blob)
            b[off] ^= 0x5A
            try:
                out = codec.decode(_refresh_crc(b))
            except CodecError:
                caught += 1
                continue
            assert out.shape == kv.shape
    assert caught > 0


@pytest.mark.parametrize("method", METHODS)
def test_truncation_raises(blobs, method):
    _, blob = blobs[method]
    codec = get_codec(method)
    for cut in sorted({0, 1, 4, 27, 28, 40, len(blob) // 3, len(blob) // 2, len(blob) - 5, len(blob) - 1}):
        with pytest.raises(CodecError):
            codec.decode(blob[:cut])
    with pytest.raises(CodecError):
        codec.decode(blob + b"\x00")


@pytest.mark.parametrize("method", METHODS)
def test_foreign_container_raises(blobs, method):
    codec = get_codec(method)
    for other in METHODS:
        if get_codec(other).codec_id != codec.codec_id:
            with pytest.raises(CodecError, match="written by"):
                codec.decode(blobs[other][1])


@pytest.mark.parametrize("method", METHODS)
def test_random_bytes_raise(method):
    g = torch.Generator().manual_seed(7)
    codec = get_codec(method)
    for n in (0, 3, 31, 200, 5000):
        rnd = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes()
        with pytest.raises(CodecError):
            codec.decode(rnd)
        # random bytes behind a real header and a valid checksum
        head = container.pack(codec.codec_id, codec.level_id, torch.float16, (2, 1, 3, 2), [rnd])
        with pytest.raises(CodecError):
            codec.decode(head)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["noise", "kv"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 257, 9), (1, 513, 3)])
def test_max_size_bounds_output(method, kind, shape):
    if kind == "noise":  # incompressible: the worst case for every entropy coder
        g = torch.Generator().manual_seed(11)
        kv = (torch.rand(2, *shape, generator=g) * 2 - 1).to(torch.float16)
    else:
        kv = kv_like(*shape, dtype=torch.float16)
    codec = get_codec(method)
    blob = codec.encode(kv)
    cap = codec.max_encoded_size(tuple(kv.shape), kv.dtype)
    assert len(blob) <= cap
    buf = bytearray(cap)  # allocate up front, write, decode the written prefix
    buf[: len(blob)] = blob
    out = codec.decode(bytes(buf[: len(blob)]))
    assert out.shape == kv.shape
    assert codecs.max_encoded_size(method, tuple(kv.shape), kv.dtype) == cap


def test_forged_huge_shape_is_rejected_before_allocating():
    """A valid checksum over a header claiming an enormous shape: sizes are checked arithmetically."""
    params = struct.pack("<BBHBB", 3, 2, 256, 1, 0) + bytes([15, 8])
    blob = container.pack(2, 0, torch.float16, (2, 1, 1000, 2**31), [params, b"", b"", b"", b"", b"", b""])
    with pytest.raises(CodecError, match="wrong size"):
        codecs.decode(blob)
    for method in ("int8", "fp8", "lossless", "lmcache-cachegen"):
        codec = get_codec(method)
        n = 2 if method != "lmcache-cachegen" else 4
        forged = container.pack(codec.codec_id, 0, torch.float16, (2, 2**20, 2**20, 2**20), [b"\x01"] * n)
        with pytest.raises(CodecError):
            codec.decode(forged)


# -- section 4, the stream meta: zlib-compressed when shorter in containers written before 2026-12-03
# (FORMAT.md §2; their coded form is tests/codecs/test_side_sections.py's) ---------------------------

def _resealed(blob: bytes, meta: bytes) -> bytes:
    header, sections = container.unpack(blob)
    sections = [bytes(s) for s in sections]
    sections[4] = meta
    return container.pack(header.codec_id, header.level_id, header.dtype, header.shape, sections)


def test_stream_meta_is_compressed_and_raw_meta_still_reads():
    from kvmesh.codecs.cachegen.codec import stream_meta

    codec = get_codec("cachegen", backend="cpu")
    kv = kv_like(layers=3, tokens=120, channels=32, seed=4)
    blob = zlib_form(codec.encode(kv))  # as written before the coded form
    raw = stream_meta(blob)
    stored = bytes(container.unpack(blob)[1][4])
    assert len(stored) < len(raw) == 2 * 2 * 3 * 32  # 2 bytes for each of the 2·L·C streams
    assert zlib.decompress(stored) == raw
    # a container holding the same meta raw (as written before compression existed) decodes the same
    assert torch.equal(codec.decode(_resealed(blob, raw)), codec.decode(blob))


@pytest.mark.parametrize("forge", ["garbage", "short", "long", "trailing", "too_long_section"])
def test_forged_stream_meta_raises(forge: str):
    """Behind a valid CRC: meta that does not inflate to exactly 2·S bytes is a CodecError, and no
    stream claiming to inflate to more is inflated past 2·S bytes."""
    from kvmesh.codecs.cachegen.codec import stream_meta

    codec = get_codec("cachegen", backend="cpu")
    blob = zlib_form(codec.encode(kv_like(layers=3, tokens=60, channels=64, seed=8)))
    raw = stream_meta(blob)
    meta = {
        "garbage": bytes(range(40)),
        "short": zlib.compress(raw[:-1], 9),
        "long": zlib.compress(raw + b"\0" * 100000, 9),  # a small stream of far more than 2·S bytes
        "trailing": zlib.compress(raw, 9) + b"\x01",
        "too_long_section": raw + b"\0",
    }[forge]
    assert len(meta) != len(raw)
    with pytest.raises(CodecError, match="stream meta"):
        codec.decode(_resealed(blob, meta))


def test_a_meta_stream_inflating_past_its_size_is_cut_off():
    from kvmesh.codecs.cachegen.codec import unpack_meta

    bomb = zlib.compress(b"\0" * 10_000_000, 9)  # ~10 kB claiming 10 MB
    with pytest.raises(CodecError, match="wrong size"):
        unpack_meta(bomb, 20_000)


# -- sections 1-3, the lead token and the side tensors: zlib of their byte-split form when shorter ------

def _with_section(blob: bytes, i: int, data: bytes) -> bytes:
    header, sections = container.unpack(blob)
    sections = [bytes(s) for s in sections]
    sections[i] = data
    return container.pack(header.codec_id, header.level_id, header.dtype, header.shape, sections)


def _raw_side(blob: bytes, i: int) -> bytes:
    """Section i (1-3) as stored before it could be compressed."""
    return raw_sections(blob)[i - 1]


def test_side_sections_are_compressed_and_raw_ones_still_read():
    """The real-KV chunk's fp16 bounds shrink; a container holding them raw (as written before)
    decodes to the same tensor."""
    from safetensors.torch import load_file

    path = Path(__file__).resolve().parents[2] / "bench" / "data" / "realkv_chunks.safetensors"
    kv = load_file(str(path))["chunk_1"] if path.exists() else kv_like(layers=3, tokens=120, channels=32, seed=4)
    codec = get_codec("cachegen", backend="cpu")
    blob = zlib_form(codec.encode(kv))  # as written before the coded form (2026-12-03)
    stored = container.unpack(blob)[1]
    old = blob
    for i in (1, 2, 3):
        raw = _raw_side(blob, i)
        assert len(stored[i]) < len(raw), f"section {i} is not compressed"
        a = np.frombuffer(raw, np.uint8)
        assert zlib.decompress(bytes(stored[i])) == np.concatenate([a[0::2], a[1::2]]).tobytes()
        old = _with_section(old, i, raw)
    assert len(old) > len(blob)
    assert torch.equal(codec.decode(old), codec.decode(blob))


@pytest.mark.parametrize("section", [1, 2, 3])
@pytest.mark.parametrize("forge", ["garbage", "short", "long", "too_long_section", "empty"])
def test_forged_side_sections_raise(section: int, forge: str):
    codec = get_codec("cachegen", backend="cpu")
    blob = zlib_form(codec.encode(kv_like(layers=3, tokens=60, channels=64, seed=8)))
    raw = _raw_side(blob, section)
    data = {
        "garbage": bytes(range(40)),
        "short": zlib.compress(raw[:-2], 9),
        "long": zlib.compress(raw + b"\0" * 100000, 9),
        "too_long_section": raw + b"\0",
        "empty": b"",
    }[forge]
    with pytest.raises(CodecError, match="lead token|side information"):
        codec.decode(_with_section(blob, section, data))
