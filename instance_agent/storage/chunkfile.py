"""The self-describing file of one chunk on disk (no pickle).

Layout: ``MAGIC`` (8 bytes), header length (uint32 little-endian), a JSON header, the payload.
The header names the chunk (key, tokens), its form (``method`` empty for raw KV, else the codec
that wrote the payload), the raw tensor's dtype and shape, the payload's length and its BLAKE2b
digest. A raw payload is the tensor's little-endian bytes; an encoded one is the codec's container.
A file whose magic, header, length or digest does not check out is ``DataCorrupt``.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kvmesh.errors import DataCorrupt

from ..tensors import dtype_from_name, dtype_name, tensor_bytes, tensor_from_bytes
from .chunk import RAW, StoredChunk

MAGIC = b"KVMCHNK\x01"
VERSION = 1
_LEN = struct.Struct("<I")
MAX_HEADER = 1 << 20
SUFFIX = ".kvchunk"


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    key: str
    start: int
    end: int
    method: str
    dtype: str
    shape: list[int]
    payload_len: int
    digest: str
    header_len: int
    parent: str = ""

    @property
    def file_len(self) -> int:
        return len(MAGIC) + _LEN.size + self.header_len + self.payload_len


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def encode_chunk(chunk: StoredChunk) -> tuple[bytes, bytes]:
    """The header bytes (magic and length included) and the payload of ``chunk``."""
    if chunk.encoded:
        payload = chunk.payload or b""
        dtype, shape = "", []
    else:
        raw = chunk.raw
        if raw is None:
            raise ValueError(f"raw chunk {chunk.key} has no tensor")
        payload = tensor_bytes(raw)
        dtype, shape = dtype_name(raw.dtype), list(raw.shape)
    header = json.dumps({
        "version": VERSION, "key": chunk.key, "start": chunk.start, "end": chunk.end,
        "method": chunk.method, "dtype": dtype, "shape": shape,
        "payload_len": len(payload), "blake2b": _digest(payload), "parent": chunk.parent,
    }, separators=(",", ":")).encode()
    return MAGIC + _LEN.pack(len(header)) + header, payload


def write_chunk(f: BinaryIO, chunk: StoredChunk) -> None:
    head, payload = encode_chunk(chunk)
    f.write(head)
    f.write(payload)


def read_header(f: BinaryIO, path: Path) -> ChunkHeader:
    """The validated header of the chunk file open as ``f`` (positioned at the payload after)."""
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise DataCorrupt(f"{path}: not a kvmesh chunk file (bad magic {magic[:8]!r})")
    raw_len = f.read(_LEN.size)
    if len(raw_len) != _LEN.size:
        raise DataCorrupt(f"{path}: truncated header")
    (hlen,) = _LEN.unpack(raw_len)
    if hlen > MAX_HEADER:
        raise DataCorrupt(f"{path}: header length {hlen} is implausible")
    raw_header = f.read(hlen)
    if len(raw_header) != hlen:
        raise DataCorrupt(f"{path}: truncated header")
    try:
        h = json.loads(raw_header)
        if h.get("version") != VERSION:
            raise DataCorrupt(f"{path}: unsupported chunk file version {h.get('version')!r}")
        header = ChunkHeader(key=str(h["key"]), start=int(h["start"]), end=int(h["end"]),
                             method=str(h["method"]), dtype=str(h["dtype"]),
                             shape=[int(d) for d in h["shape"]], payload_len=int(h["payload_len"]),
                             digest=str(h["blake2b"]), header_len=hlen, parent=str(h.get("parent", "")))
    except (ValueError, KeyError, TypeError) as err:
        raise DataCorrupt(f"{path}: malformed header: {err}") from err
    return header


def check_file(path: Path) -> ChunkHeader:
    """The header of ``path``, checked against the file's length (payload digest not read)."""
    with open(path, "rb") as f:
        header = read_header(f, path)
    size = path.stat().st_size
    if size != header.file_len:
        raise DataCorrupt(f"{path}: {size} bytes on disk, the header says {header.file_len}")
    return header


def read_chunk(path: Path) -> StoredChunk:
    """The chunk in ``path``, its payload digest verified."""
    with open(path, "rb") as f:
        header = read_header(f, path)
        payload = f.read(header.payload_len + 1)
    return chunk_from_parts(header, payload, path)


def chunk_from_parts(header: ChunkHeader, payload: bytes, where: object) -> StoredChunk:
    """The chunk of a checked ``header`` and its ``payload`` (length and digest verified);
    ``where`` names the source in errors (a file, a remote key)."""
    if len(payload) != header.payload_len:
        raise DataCorrupt(f"{where}: payload is {len(payload)} bytes, the header says {header.payload_len}")
    if _digest(payload) != header.digest:
        raise DataCorrupt(f"{where}: payload checksum mismatch")
    if header.method == RAW:
        try:
            raw = tensor_from_bytes(payload, dtype_from_name(header.dtype), header.shape)
        except Exception as err:  # an InvalidArgument here means the stored bytes, not the caller, are wrong
            raise DataCorrupt(f"{where}: raw payload does not match its header: {err}") from err
        return StoredChunk(header.key, header.start, header.end, RAW, raw=raw, parent=header.parent)
    return StoredChunk(header.key, header.start, header.end, header.method, payload=payload, parent=header.parent)
