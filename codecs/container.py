"""The versioned, self-describing container every codec writes.

Layout (all integers little-endian; see codecs/cachegen/FORMAT.md for the full specification):

    offset  size  field
    0       4     magic b"KVMC"
    4       1     format version (1)
    5       1     codec id (METHOD_IDS)
    6       1     level id (codec-specific; 0 = the codec's default)
    7       1     dtype code (DTYPE_CODES)
    8       1     ndim (always 4: [2, layers, tokens, channels])
    9       1     number of sections n
    10      2     reserved, 0
    12      16    shape, 4 x uint32
    28      4n    section lengths, n x uint32
    28+4n   ...   the sections, concatenated
    end-4   4     CRC-32 (zlib.crc32) of every byte before it

The codec owns what its sections mean; this module checks structure and integrity only.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

from kvmesh.codecs.errors import CodecError

MAGIC = b"KVMC"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sBBBBBBH4I")
FIXED_HEADER_BYTES = _FIXED.size  # 28
CRC_BYTES = 4
MAX_SECTIONS = 16

# Wire ids: never renumber, only append.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass(frozen=True)
class Header:
    codec_id: int
    level_id: int
    dtype: torch.dtype
    shape: tuple[int, int, int, int]
    section_lengths: tuple[int, ...]


def container_overhead(n_sections: int) -> int:
    """Bytes a container spends outside its sections."""
    return FIXED_HEADER_BYTES + 4 * n_sections + CRC_BYTES


def pack_head(codec_id: int, level_id: int, dtype: torch.dtype, shape: tuple[int, ...],
              section_lengths: list[int] | tuple[int, ...]) -> bytes:
    """The fixed header and the section table: the bytes before the first section. (For writers that
    assemble the sections elsewhere, e.g. on a GPU, and know only their lengths here.)"""
    if len(section_lengths) > MAX_SECTIONS:
        raise CodecError(f"too many sections: {len(section_lengths)}")
    if len(shape) != 4 or any(not 0 <= int(d) < 2**32 for d in shape):
        raise CodecError(f"shape {tuple(shape)} cannot be stored")
    head = _FIXED.pack(MAGIC, FORMAT_VERSION, codec_id, level_id, DTYPE_CODES[dtype], 4, len(section_lengths), 0,
                       *map(int, shape))
    return head + struct.pack(f"<{len(section_lengths)}I", *map(int, section_lengths))


def pack(codec_id: int, level_id: int, dtype: torch.dtype, shape: tuple[int, ...], sections: list[bytes]) -> bytes:
    body = b"".join([pack_head(codec_id, level_id, dtype, shape, [len(s) for s in sections]), *sections])
    return body + struct.pack("<I", zlib.crc32(body))


def read_header(blob: bytes | bytearray | memoryview) -> Header:
    """Parses and checks the header and the checksum; raises CodecError on anything wrong."""
    header = read_header_unverified(blob)
    mv = memoryview(blob).cast("B") if not isinstance(blob, memoryview) else blob.cast("B")
    (crc,) = struct.unpack_from("<I", mv, len(mv) - CRC_BYTES)
    if zlib.crc32(mv[: len(mv) - CRC_BYTES]) != crc:
        raise CodecError(CHECKSUM_MISMATCH)
    return header


CHECKSUM_MISMATCH = "corrupt container: checksum mismatch"


def stored_crc(blob: bytes | bytearray | memoryview) -> int:
    """The CRC-32 a container stores in its last 4 bytes (for a reader that checks it elsewhere)."""
    return struct.unpack_from("<I", blob, len(blob) - CRC_BYTES)[0]


def read_header_unverified(blob: bytes | bytearray | memoryview) -> Header:
    """read_header without the checksum: for a reader that checks the CRC elsewhere (on a GPU) and
    raises CHECKSUM_MISMATCH itself. Every structural check is made here."""
    mv = memoryview(blob).cast("B") if not isinstance(blob, memoryview) else blob.cast("B")
    if len(mv) < FIXED_HEADER_BYTES + CRC_BYTES:
        raise CodecError(f"not a kvmesh container: {len(mv)} bytes is shorter than any header")
    magic, version, codec_id, level_id, dtype_code, ndim, n_sec, reserved, *shape = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CodecError("not a kvmesh container: bad magic")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported container format version {version} (this build reads {FORMAT_VERSION})")
    if ndim != 4 or reserved != 0 or n_sec > MAX_SECTIONS:
        raise CodecError("corrupt container: bad header fields")
    if dtype_code not in CODE_DTYPES:
        raise CodecError(f"corrupt container: unknown dtype code {dtype_code}")
    end_lengths = FIXED_HEADER_BYTES + 4 * n_sec
    if len(mv) < end_lengths + CRC_BYTES:
        raise CodecError("truncated container: section table cut off")
    lengths = struct.unpack_from(f"<{n_sec}I", mv, FIXED_HEADER_BYTES)
    if end_lengths + sum(lengths) + CRC_BYTES != len(mv):
        raise CodecError(
            f"truncated or corrupt container: sections say {end_lengths + sum(lengths) + CRC_BYTES} bytes, got {len(mv)}")
    return Header(codec_id, level_id, CODE_DTYPES[dtype_code], tuple(shape), tuple(lengths))


def unpack(blob: bytes | bytearray | memoryview) -> tuple[Header, list[memoryview]]:
    """Checks the container and returns its header and its sections (views into blob)."""
    return _sections(read_header(blob), blob)


def unpack_unverified(blob: bytes | bytearray | memoryview) -> tuple[Header, list[memoryview]]:
    """unpack without the checksum (read_header_unverified)."""
    return _sections(read_header_unverified(blob), blob)


def _sections(header: Header, blob: bytes | bytearray | memoryview) -> tuple[Header, list[memoryview]]:
    mv = memoryview(blob).cast("B")
    pos = FIXED_HEADER_BYTES + 4 * len(header.section_lengths)
    sections = []
    for n in header.section_lengths:
        sections.append(mv[pos : pos + n])
        pos += n
    return header, sections
