"""Chunk keys: the one implementation the agents and the controller share (torch-free).

Tokens are cut into ``chunk_size`` chunks; the last one may be partial. Each chunk's key chains the
previous chunk's key with the chunk's tokens through BLAKE2b, starting from a fixed root, so a key
names a whole prefix: two sequences share a chunk key exactly when they share every token up to
the end of that chunk. Tokens are hashed as little-endian unsigned 64-bit integers.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

KEY_BYTES = 16
ROOT_KEY = hashlib.blake2b(b"kvmesh-chunk-key-v1", digest_size=KEY_BYTES).digest()
MAX_TOKEN = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a token sequence: its index, its key and the tokens [start, end) it holds."""

    index: int
    key: str
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def chain_key(prev_key: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a chunk holding ``tokens`` that follows the chunk keyed ``prev_key``."""
    h = hashlib.blake2b(prev_key, digest_size=KEY_BYTES)
    h.update(struct.pack(f"<{len(tokens)}Q", *tokens))
    return h.digest()


def chunk_spans(tokens: Sequence[int], chunk_size: int) -> list[ChunkSpan]:
    """Every chunk of ``tokens`` (the partial last one included), with its hex key."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    spans: list[ChunkSpan] = []
    key = ROOT_KEY
    for index, start in enumerate(range(0, len(tokens), chunk_size)):
        end = min(start + chunk_size, len(tokens))
        key = chain_key(key, tokens[start:end])
        spans.append(ChunkSpan(index=index, key=key.hex(), start=start, end=end))
    return spans


def chunk_ref_error(key: str, start: int, end: int) -> str | None:
    """Why (key, [start, end)) cannot name a chunk, or None."""
    if len(key) != 2 * KEY_BYTES or any(c not in "0123456789abcdef" for c in key):
        return f"chunk_key {key!r} is not a {2 * KEY_BYTES}-digit hex chunk key"
    if not 0 <= start < end:
        return f"tokens [{start}, {end}) are not a chunk"
    return None


def validate_tokens(tokens: Sequence[object], max_tokens: int | None = None) -> list[int]:
    """``tokens`` as a list of ints, or ValueError saying what is wrong with it."""
    out: list[int] = []
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"tokens[{i}] is {t!r}: tokens must be integers")
        if t < 0 or t > MAX_TOKEN:
            raise ValueError(f"tokens[{i}] is {t}: tokens must be in [0, 2^63)")
        out.append(t)
    if max_tokens is not None and len(out) > max_tokens:
        raise ValueError(f"{len(out)} tokens is over the limit of {max_tokens}")
    return out
