"""Sections 1-4 of a cachegen container in their coded form (FORMAT.md §2, "Coded side sections").

Why not zlib: no GPU writes zlib's bytes, and the project promises that the CPU and the device write
the same container. These sections are byte planes with skewed order-0 statistics (fp16 exponents,
stream centres and table indices), so each plane is coded with the rANS coder both devices already
have (kvmesh-rans32x16), against a table normalised from the plane's own histogram with integer
arithmetic, in independent blocks of SIDE_BLOCK symbols (a GPU codes them side by side). On real KV
this is ~6% smaller than zlib level 6 over the four sections.

The CPU path is the C extension (csrc/sidecode.c); the Triton path is device_pipeline.py; the numpy
reference both are checked against is tests/codecs/reference/sidecode.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvmesh.codecs.cachegen import native as _native  # noqa: F401 - the extension's import error says how to build it
from kvmesh.codecs.cachegen import _ransc
from kvmesh.codecs.errors import CodecError

SIDE_BLOCK = 1024  # symbols per rANS block
MODE_RAW, MODE_PLAIN, MODE_DELTA = 0, 1, 2
TABLE_BYTES = 32  # the presence bitmap before the 12-bit frequencies
# planes per section and whether its bytes are byte-split first (sections 1-3: fp16 exponents together)
PLANES = {1: 2, 2: 2, 3: 2, 4: 4}
SPLIT = {1: True, 2: True, 3: True, 4: False}

_ERRORS = {
    1: "a plane's mode byte is not 0 (raw), 1 (rANS) or 2 (rANS of deltas)",
    2: "the coded section ends early or has bytes left over",
    3: "a plane's frequency table is empty, has padding bits set or does not sum to 4096",
    4: "a plane's block word counts are out of range or do not sum to its words",
    5: "a rANS block does not end in the initial state having read exactly its words",
}


def encode(raw: bytes, section: int) -> bytes:
    """Section 1-4's bytes as stored: the coded form when that is shorter, else raw (exactly len(raw))."""
    return _ransc.side_encode(raw, PLANES[section], SPLIT[section])


def decode(stored: bytes | memoryview, n: int, section: int, what: str) -> bytes:
    """The n raw bytes of section 1-4 from its stored form (raw when it is n bytes long)."""
    if len(stored) > n:
        raise CodecError(f"corrupt cachegen container: {what} section is too long ({len(stored)} > {n} bytes)")
    out = _ransc.side_decode(stored, n, PLANES[section], SPLIT[section])
    if isinstance(out, int):
        raise CodecError(f"corrupt cachegen container: {what} section: {_ERRORS.get(out, 'corrupt')}")
    return out


@dataclass
class Plane:
    """One plane of a coded section as the host reads it (for the device decode): its mode, where its
    bytes (raw) or words (coded) start in the section, and for a coded plane its table and counts."""
    mode: int
    at: int
    freq: np.ndarray | None = None  # int64 [256]
    counts: np.ndarray | None = None  # int64 [blocks]


def _fail(code: int, what: str) -> CodecError:
    return CodecError(f"corrupt cachegen container: {what} section: {_ERRORS[code]}")


def parse(stored: bytes | memoryview, n: int, section: int, what: str) -> list[Plane] | None:
    """The planes of a coded section (None: stored raw), with every check csrc/sidecode.c makes
    before decoding, in its order, and its errors; the words themselves are decoded by the device."""
    if len(stored) > n:
        raise CodecError(f"corrupt cachegen container: {what} section is too long ({len(stored)} > {n} bytes)")
    if len(stored) == n:
        return None
    planes = PLANES[section]
    m = n // planes
    if m // SIDE_BLOCK > len(stored) // 4:
        raise _fail(2, what)
    buf = np.frombuffer(stored, np.uint8)
    out, pos = [], 0
    for _ in range(planes):
        if pos >= len(buf):
            raise _fail(2, what)
        mode = int(buf[pos])
        pos += 1
        if mode == MODE_RAW:
            if len(buf) - pos < m:
                raise _fail(2, what)
            out.append(Plane(mode, pos))
            pos += m
        elif mode in (MODE_PLAIN, MODE_DELTA):
            plane, pos = _parse_coded(buf, pos, m, what)
            plane.mode = mode
            out.append(plane)
        else:
            raise _fail(1, what)
    if pos != len(buf):
        raise _fail(2, what)
    return out


def _parse_coded(buf: np.ndarray, pos: int, m: int, what: str) -> tuple[Plane, int]:
    avail = len(buf) - pos
    if avail < TABLE_BYTES:
        raise _fail(2, what)
    present = np.unpackbits(buf[pos:pos + TABLE_BYTES], bitorder="little").astype(bool)
    nz = int(present.sum())
    ntab = TABLE_BYTES + (12 * nz + 7) // 8
    if nz == 0:
        raise _fail(3, what)
    if avail < ntab + 7:
        raise _fail(2, what)
    bits = np.unpackbits(buf[pos + TABLE_BYTES:pos + ntab], bitorder="little")
    values = (bits[:12 * nz].reshape(nz, 12).astype(np.int64) << np.arange(12)).sum(axis=1) + 1
    if values.sum() != 4096 or bits[12 * nz:].any():
        raise _fail(3, what)
    freq = np.zeros(256, np.int64)
    freq[present] = values
    p = pos + ntab
    words = int.from_bytes(bytes(buf[p:p + 4]), "little")
    base, width = int(buf[p + 4]) | int(buf[p + 5]) << 8, int(buf[p + 6])
    nb = -(-m // SIDE_BLOCK)
    if width > 16:
        raise _fail(4, what)
    head = ntab + 4 + 3 + (nb * width + 7) // 8
    if avail < head or (avail - head) // 2 < words:
        raise _fail(2, what)
    cbits = np.unpackbits(buf[p + 7:pos + head], bitorder="little")[:nb * width]
    counts = (cbits.reshape(nb, width).astype(np.int64) << np.arange(width)).sum(axis=1) + base if width \
        else np.full(nb, base, np.int64)
    lengths = np.full(nb, SIDE_BLOCK, np.int64)
    lengths[-1] = m - (nb - 1) * SIDE_BLOCK
    if (counts < 2).any() or (counts > lengths + 2).any() or counts.sum() != words:
        raise _fail(4, what)
    return Plane(MODE_PLAIN, pos + head, freq, counts), pos + head + 2 * words
