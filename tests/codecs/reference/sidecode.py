"""The numpy reference of the coded side sections (FORMAT.md §2 "Coded side sections") that the C
extension (csrc/sidecode.c) and the Triton path (device_pipeline.py) are checked against, and the
writer of the former zlib form (containers written before 2026-12-03) for the compatibility tests."""
from __future__ import annotations

import zlib

import numpy as np

from kvmesh.codecs import container
from kvmesh.codecs.cachegen import codec as cg
from kvmesh.codecs.cachegen import quant, rans
from kvmesh.codecs.cachegen.sidecode import PLANES, SIDE_BLOCK, SPLIT


def normalize(h: np.ndarray, m: int) -> np.ndarray:
    """freq[s] = h[s] ? 1 + floor(h[s]·(4096 - nz) / m) : 0; the remainder to the first most frequent."""
    h = h.astype(np.int64)
    nz = int((h > 0).sum())
    freq = np.where(h > 0, 1 + h * (rans.M - nz) // m, 0)
    freq[int(np.argmax(h))] += rans.M - int(freq.sum())
    return freq


def pack_bits(values: np.ndarray, width: int) -> bytes:
    bits = ((values.astype(np.int64)[:, None] >> np.arange(width)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def code_plane(y: np.ndarray) -> bytes:
    """Mode 1/2's bytes after the mode byte for the m symbols y."""
    m = y.size
    h = np.bincount(y, minlength=256)
    freq = normalize(h, m)
    cum = np.zeros(257, np.int64)
    np.cumsum(freq, out=cum[1:])
    nb = -(-m // SIDE_BLOCK)
    sym = np.zeros((nb, SIDE_BLOCK), np.uint8)
    sym.reshape(-1)[:m] = y
    lengths = np.full(nb, SIDE_BLOCK, np.int64)
    lengths[-1] = m - (nb - 1) * SIDE_BLOCK
    words, counts = rans.encode(sym, lengths, np.zeros(nb, np.int64), freq[None, :], cum[None, :])
    bitmap = np.packbits(h > 0, bitorder="little").tobytes()
    base = int(counts.min())
    width = int(counts.max() - base).bit_length()
    return (bitmap + pack_bits(freq[h > 0] - 1, 12) + np.uint32(words.size).tobytes()
            + np.array([base], "<u2").tobytes() + bytes([width]) + pack_bits(counts - base, width)
            + words.astype("<u2").tobytes())


def encode(raw: bytes, section: int) -> bytes:
    """The stored form of section 1-4: coded when shorter, else raw."""
    a = np.frombuffer(raw, np.uint8)
    if SPLIT[section]:
        a = np.concatenate([a[0::2], a[1::2]])
    out = []
    for y in np.split(a, PLANES[section]) if a.size else []:
        d = np.concatenate([y[:1], (y[1:].astype(np.int16) - y[:-1]) & 255]).astype(np.uint8)
        options = [bytes(y), code_plane(y), code_plane(d)]
        mode = min(range(3), key=lambda i: (len(options[i]), i))
        out.append(bytes([mode]) + options[mode])
    coded = b"".join(out)
    return coded if len(coded) < len(raw) else bytes(raw)


# ---- the former zlib form ---------------------------------------------------------------------------

def _zlib_side(raw: bytes) -> bytes:
    a = np.frombuffer(raw, np.uint8)
    packed = zlib.compress(np.concatenate([a[0::2], a[1::2]]).tobytes(), 6)
    return packed if len(packed) < len(raw) else raw


def _zlib_meta(meta: bytes) -> bytes:
    packed = zlib.compress(meta, 6)
    return packed if len(packed) < len(meta) else meta


def raw_sections(blob: bytes) -> list[bytes]:
    """Sections 1-4 of a cachegen container (either form) as raw bytes."""
    header, sections = container.unpack(blob)
    _, L, T, C = header.shape
    kmode, vmode, _, _, lead = cg._PARAMS.unpack_from(sections[0], 0)
    coded = bool(cg._read_variant(sections, L) & cg.VARIANT_CODED)
    rest = T - lead
    sizes = [cg.lead_bytes(L, lead, C), cg.side_bytes(kmode, L, rest, C) if rest else 0,
             cg.side_bytes(vmode, L, rest, C) if rest else 0, 4 * L * C * quant.num_segments(rest) if rest else 0]
    out = [bytes(cg.unpack_side(sections[i], sizes[i - 1], "x", coded)) for i in (1, 2, 3)]
    return out + [cg.unpack_meta(sections[4], sizes[3], coded=coded)]


def zlib_form(blob: bytes) -> bytes:
    """The container as a writer before 2026-12-03 wrote it: variant bit 2 clear, sections 1-4 zlib
    streams where shorter (level 6), everything else the same."""
    header, sections = container.unpack(blob)
    sections = [bytes(s) for s in sections]
    raws = raw_sections(blob)
    sections[1:4] = [_zlib_side(r) for r in raws[:3]]
    sections[4] = _zlib_meta(raws[3])
    sections[0] = sections[0][:-1] + bytes([sections[0][-1] & ~cg.VARIANT_CODED])
    return container.pack(header.codec_id, header.level_id, header.dtype, header.shape, sections)
