"""Sections 1-4's coded form (FORMAT.md §2 "Coded side sections", 2026-12-03): the compiled CPU coder
(csrc/sidecode.c), the Triton path (device_sidecode.py, interpreted on a CPU-only machine) and the
numpy reference (tests/codecs/reference/sidecode.py) write the same bytes; every path reads them and
the zlib sections of containers written before; corrupt coded sections are CodecErrors saying what."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError, container, get_codec
from kvmesh.codecs.cachegen import codec as cg
from kvmesh.codecs.cachegen import sidecode
from tests.codecs.conftest import bits, kv_like
from tests.codecs.reference import sidecode as ref
from tests.codecs.test_triton_kernels import DEVICE, load_kernels

load_kernels()

from kvmesh.codecs.cachegen import device_sidecode as dsc  # noqa: E402

CHUNKS = Path(__file__).resolve().parents[2] / "bench" / "data" / "realkv_chunks.safetensors"


@pytest.fixture(autouse=True)
def interpret_env(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _real_chunk(name: str = "chunk_0") -> torch.Tensor:
    from safetensors.torch import load_file

    if not CHUNKS.exists():
        pytest.fail(f"{CHUNKS} is committed with the repository; it is missing")
    return load_file(str(CHUNKS))[name]


def _real_sections(level: str = "cachegen") -> list[bytes]:
    """Sections 1-4 (raw) of a real SmolLM2 chunk [2, 30, 256, 192] at a level."""
    return ref.raw_sections(get_codec(level, backend="cpu").encode(_real_chunk()))


def _cases() -> list[tuple[str, bytes, int]]:
    """(name, raw bytes, section kind) covering every plane mode and block boundary."""
    rng = np.random.default_rng(5)
    ramp = (np.arange(6000) // 3 % 256).astype(np.uint8)  # deltas of 0/1: mode 2
    skew = rng.geometric(0.3, 2 * 2049).clip(0, 255).astype(np.uint8)  # order-0 skew: mode 1
    mixed = np.empty(6000, np.uint8)
    mixed[0::2], mixed[1::2] = rng.integers(0, 256, 3000, dtype=np.uint8), skew[:3000]  # planes: raw, rANS
    return [
        ("random", rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(), 2),  # raw
        ("constant", bytes(2 * 1024), 2),  # one symbol: frequency 4096, two words a block
        ("ramp", ramp.tobytes(), 4),
        ("skew, 2049 a plane", skew.tobytes(), 1),
        ("skew, 1023 a plane", skew[:4 * 1023].tobytes(), 4),
        ("mixed planes", mixed.tobytes(), 3),
        ("tiny", b"\x01\x02\x01\x02", 4),
        ("empty", b"", 2),
    ]


@pytest.mark.parametrize("case", range(8))
def test_c_coder_writes_the_references_bytes_and_reads_them(case: int) -> None:
    name, raw, kind = _cases()[case]
    stored = sidecode.encode(raw, kind)
    assert stored == ref.encode(raw, kind), name
    assert len(stored) <= len(raw)
    assert sidecode.decode(stored, len(raw), kind, "test") == raw


def test_every_plane_mode_is_exercised() -> None:
    modes = set()
    for _, raw, kind in _cases():
        for plane in sidecode.parse(sidecode.encode(raw, kind), len(raw), kind, "x") or []:
            modes.add(plane.mode)
    assert modes == {0, 1, 2}


@pytest.mark.parametrize("level", ["cachegen", "cachegen-hq"])
def test_real_kv_sections_match_the_reference_and_beat_zlib(level: str) -> None:
    """On a real chunk the C coder writes the reference's bytes, and the four sections together are
    smaller than the zlib (level 6) form they replace."""
    raws = _real_sections(level)
    stored = [sidecode.encode(r, i + 1) for i, r in enumerate(raws)]
    assert stored == [ref.encode(r, i + 1) for i, r in enumerate(raws)]
    zl = [ref._zlib_side(r) for r in raws[:3]] + [ref._zlib_meta(raws[3])]
    assert sum(map(len, stored)) < sum(map(len, zl))
    assert sum(map(len, stored)) < 0.8 * sum(map(len, raws))


def _device_encode(raws: list[bytes]) -> list[bytes]:
    dev = [torch.frombuffer(bytearray(r), dtype=torch.uint8).to(DEVICE) if r else
           torch.zeros(0, dtype=torch.uint8, device=DEVICE) for r in raws]
    buf = torch.full((sum(map(len, raws)),), 0xAA, dtype=torch.uint8, device=DEVICE)
    lens = dsc.encode_into(dev, buf, DEVICE.type == "cpu").cpu().tolist()
    out, at = [], 0
    for n in lens:
        out.append(bytes(buf[at:at + n].cpu().numpy()))
        at += n
    return out


def _device_decode(stored: list[bytes], sizes: list[int]) -> tuple[list[bytes], list[int]]:
    blob = b"\x07" * 3 + b"".join(stored)  # an odd offset: the words are not aligned in a real blob either
    offsets = list(np.cumsum([3] + [len(s) for s in stored])[:4])
    planes = [sidecode.parse(s, n, i + 1, "x") for i, (s, n) in enumerate(zip(stored, sizes))]
    plan = dsc.decode_plan([int(o) for o in offsets], sizes, planes)
    b = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(DEVICE)
    tables = torch.frombuffer(bytearray(plan.extra), dtype=torch.uint8).to(DEVICE) if plan.n_lanes else b[:0]
    raws, bad = dsc.decode(b, tables, plan, DEVICE.type == "cpu")
    return [bytes(r.cpu().numpy()) for r in raws], bad.cpu().tolist()


def test_triton_coder_writes_the_c_coders_bytes_on_real_kv() -> None:
    """Real-shaped sections 1-4 ([2, 30, 256, 192]: 61,740 raw bytes, ten planes, both rANS modes)
    coded by the Triton kernels: the C coder's bytes, and both read back."""
    raws = _real_sections()
    want = [sidecode.encode(r, i + 1) for i, r in enumerate(raws)]
    assert {p.mode for i, s in enumerate(want) for p in sidecode.parse(s, len(raws[i]), i + 1, "x") or []} >= {1, 2}
    assert _device_encode(raws) == want
    back, bad = _device_decode(want, [len(r) for r in raws])
    assert back == raws and bad == [0, 0, 0, 0]


def test_triton_coder_matches_on_every_plane_mode_and_boundary() -> None:
    cases = dict((name, raw) for name, raw, _ in _cases())
    # four "sections" at a time, in the pipeline's kinds (1-3 split in two planes, 4 in four); the
    # interpreter's cost grows with the longest block, so the tiny ones go together
    groups = [[cases["skew, 2049 a plane"], cases["constant"], cases["mixed planes"], cases["ramp"][:4 * 1023]],
              [cases["tiny"], b"", b"\x05\x05", b"\x01\x02\x03\x04"]]
    for raws in groups:
        want = [sidecode.encode(r, i + 1) for i, r in enumerate(raws)]
        assert _device_encode(raws) == want
        back, bad = _device_decode(want, [len(r) for r in raws])
        assert back == raws and bad == [0, 0, 0, 0]
    modes = {p.mode for i, r in enumerate(groups[0]) for p in sidecode.parse(sidecode.encode(r, i + 1), len(r), i + 1, "x")}
    assert modes == {0, 1, 2}


def test_containers_say_so_and_old_zlib_containers_read_the_same_everywhere() -> None:
    """Every container written from 2026-12-03 sets variant bit 2; one rewritten in the former zlib
    form (bit 2 clear) decodes to the same tensor on the CPU and the Triton path."""
    kv = kv_like(2, 60, 64, dtype=torch.float32, seed=3)
    cpu, tri = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="triton")
    blob = cpu.encode(kv)
    params = bytes(container.unpack(blob)[1][0])
    assert params[-1] & cg.VARIANT_CODED
    assert sum(len(s) < len(r) for s, r in zip(container.unpack(blob)[1][1:5], ref.raw_sections(blob))) >= 2
    old = ref.zlib_form(blob)
    assert not bytes(container.unpack(old)[1][0])[-1] & cg.VARIANT_CODED
    assert old != blob  # (on chunks this small the planes' tables can cost more than zlib: real KV pays less)
    want = cpu.decode(blob)
    for codec in (cpu, tri):
        for b in (blob, old):
            assert torch.equal(bits(codec.decode(b).cpu()), bits(want))


def test_predicted_and_token_less_chunks_use_the_coded_form_too() -> None:
    """codec.py's own paths (no rest tokens; the level that keeps them) write and read the new form."""
    cpu = get_codec("cachegen", backend="cpu")
    kv = kv_like(2, 1, 64, dtype=torch.float16, seed=1)
    blob = cpu.encode(kv)
    assert bytes(container.unpack(blob)[1][0])[-1] & cg.VARIANT_CODED
    assert torch.equal(bits(cpu.decode(blob)), bits(cpu.decode(ref.zlib_form(blob))))


def _resealed(blob: bytes, i: int, data: bytes) -> bytes:
    header, sections = container.unpack(blob)
    sections = [bytes(s) for s in sections]
    sections[i] = data
    return container.pack(header.codec_id, header.level_id, header.dtype, header.shape, sections)


def _forgeries(stored: bytes) -> dict[str, tuple[bytes, str]]:
    """Corrupt versions of a coded section whose first plane is rANS-coded: (bytes, error words)."""
    first = stored[0]
    assert first in (1, 2)
    nz = bin(int.from_bytes(stored[1:33], "little")).count("1")
    ftab = 1 + 32 + (12 * nz + 7) // 8
    words = bytearray(stored)
    words[-3] ^= 0x10  # inside the last plane's words (or bytes)
    return {
        "mode": (bytes([7]) + stored[1:], "mode byte"),
        "truncated": (stored[:-1], "ends early|does not end"),
        "trailing": (stored + b"\0" if len(stored) + 1 < 10**9 else stored, "bytes left over|too long"),
        "empty table": (bytes([first]) + bytes(32) + stored[33:], "frequency table"),
        "table sum": (stored[:33] + bytes([stored[33] ^ 1]) + stored[34:], "frequency table"),
        "word total": (stored[:ftab] + struct.pack("<I", struct.unpack_from("<I", stored, ftab)[0] + 1)
                       + stored[ftab + 4:], "word counts|ends early"),
    }


@pytest.mark.parametrize("forge", ["mode", "truncated", "trailing", "empty table", "table sum", "word total"])
def test_forged_coded_sections_raise_the_same_error_on_both_paths(forge: str) -> None:
    """Behind a valid CRC, a forged coded section is a CodecError naming the section and what is wrong,
    the same on the CPU and the Triton path, and nothing past the section is read."""
    kv = kv_like(2, 60, 64, dtype=torch.float32, seed=3)
    cpu, tri = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="triton")
    blob = cpu.encode(kv)
    stored = bytes(container.unpack(blob)[1][4])  # stream meta: coded
    assert len(stored) < len(cg.stream_meta(blob))
    data, words = _forgeries(stored)[forge]
    bad = _resealed(blob, 4, data)
    errors = []
    for codec in (cpu, tri):
        with pytest.raises(CodecError, match=words) as e:
            codec.decode(bad)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert "stream meta" in errors[0] or "too long" in errors[0]


def test_a_flipped_word_fails_the_block_end_state_check_on_both_paths() -> None:
    kv = kv_like(2, 60, 64, dtype=torch.float32, seed=3)
    cpu, tri = get_codec("cachegen", backend="cpu"), get_codec("cachegen", backend="triton")
    blob = cpu.encode(kv)
    planes = sidecode.parse(container.unpack(blob)[1][4], len(cg.stream_meta(blob)), 4, "x")
    coded = next(p for p in planes if p.counts is not None)
    stored = bytearray(container.unpack(blob)[1][4])
    stored[coded.at + 1] ^= 0x40  # the first block's first word (its initial state)
    bad = _resealed(blob, 4, bytes(stored))
    errors = []
    for codec in (cpu, tri):
        with pytest.raises(CodecError, match="stream meta section: a rANS block does not end") as e:
            codec.decode(bad)
        errors.append(str(e.value))
    assert errors[0] == errors[1]


def test_a_tiny_section_cannot_claim_a_huge_size() -> None:
    """The raw size comes from the header's shape: a few forged bytes must not make the reader allocate
    it (every rANS block takes at least two words)."""
    with pytest.raises(CodecError, match="ends early"):
        sidecode.decode(b"\x01" * 40, 4 << 30, 4, "stream meta")
    with pytest.raises(CodecError, match="ends early"):
        sidecode.parse(b"\x01" * 40, 4 << 30, 4, "stream meta")


def test_unknown_variant_bits_are_refused() -> None:
    blob = get_codec("cachegen", backend="cpu").encode(kv_like(1, 8, 8, seed=2))
    header, sections = container.unpack(blob)
    sections = [bytes(s) for s in sections]
    sections[0] = sections[0][:-1] + bytes([sections[0][-1] | 0x08])
    forged = container.pack(header.codec_id, header.level_id, header.dtype, header.shape, sections)
    with pytest.raises(CodecError, match="unknown variant flags"):
        get_codec("cachegen", backend="cpu").decode(forged)
    assert zlib.crc32(forged[:-4]) == struct.unpack("<I", forged[-4:])[0]


def test_device_coder_launches_are_bounded() -> None:
    """Sections 1-4 coded on the device for a real chunk: every piece of every section and plane header
    is placed by one masked-store kernel launch each (_put), not the ~8 torch ops an index_put costs;
    the whole coder stays under 220 launches a chunk (it was 301), whatever the data."""
    from tests.codecs.test_triton_device_pipeline import count_launches

    raws = _real_sections("cachegen")
    dev = [torch.frombuffer(bytearray(r), dtype=torch.uint8).to(DEVICE) for r in raws]
    buf = torch.zeros(sum(map(len, raws)), dtype=torch.uint8, device=DEVICE)
    dsc.encode_into(dev, buf, DEVICE.type == "cpu")
    with count_launches() as c:
        dsc.encode_into(dev, buf, DEVICE.type == "cpu")
    assert c.n <= 220, c.n
