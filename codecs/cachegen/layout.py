"""How a chunk's symbols are cut into rANS streams.

Stream k = ((kv * L + layer) * C + channel) * nseg + segment holds the symbols of one channel of one
layer of K or V over one segment of up to SEGMENT (256) tokens, in token order. Short streams keep a
long chunk from becoming a long serial loop: a GPU thread (or a numpy lane) runs each stream.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.codecs.cachegen.quant import SEGMENT, num_segments


@dataclass(frozen=True)
class StreamLayout:
    layers: int
    tokens: int
    channels: int
    nseg: int
    levels: np.ndarray  # int64 [2, L]
    stream_levels: np.ndarray  # int64 [S]: the alphabet size B of each stream
    lengths: np.ndarray  # int32 [S]
    groups: tuple[tuple[int, np.ndarray], ...]  # (B, stream indices with that B), B ascending

    @property
    def num_streams(self) -> int:
        return int(self.lengths.size)

    @property
    def max_levels(self) -> int:
        return int(self.levels.max())


def stream_layout(layers: int, tokens: int, channels: int, levels: np.ndarray) -> StreamLayout:
    nseg = num_segments(tokens)
    per_block = channels * nseg  # streams per (kv, layer)
    stream_levels = np.repeat(levels.reshape(-1), per_block).astype(np.int64)
    seg_len = np.minimum(SEGMENT, tokens - np.arange(nseg) * SEGMENT).astype(np.int32)
    lengths = np.tile(seg_len, 2 * layers * channels)
    groups = tuple((int(b), np.flatnonzero(stream_levels == b)) for b in np.unique(stream_levels))
    return StreamLayout(layers, tokens, channels, nseg, levels, stream_levels, lengths, groups)


def to_streams(q: torch.Tensor, nseg: int) -> torch.Tensor:
    """[2, L, T, C] -> [S, SEGMENT] (positions past the chunk's end are 0)."""
    _, L, T, C = q.shape
    pad = nseg * SEGMENT - T
    if pad:
        q = torch.cat([q, q.new_zeros(2, L, pad, C)], dim=2)
    return q.reshape(2, L, nseg, SEGMENT, C).permute(0, 1, 4, 2, 3).reshape(-1, SEGMENT)


def from_streams(s: torch.Tensor, layers: int, tokens: int, channels: int, nseg: int) -> torch.Tensor:
    """[S, SEGMENT] -> [2, L, T, C]."""
    q = s.reshape(2, layers, channels, nseg, SEGMENT).permute(0, 1, 3, 4, 2).reshape(2, layers, nseg * SEGMENT, channels)
    return q[:, :, :tokens].contiguous()


@functools.lru_cache(maxsize=16)
def element_stream_ids(layers: int, tokens: int, channels: int, width: int = 256) -> torch.Tensor:
    """int64 [2, L, T, C]: the stream of every element, times `width` (ready for a bincount index)."""
    nseg = num_segments(tokens)
    block = torch.arange(2 * layers, dtype=torch.int64).reshape(2, layers, 1, 1) * (channels * nseg)
    chan = torch.arange(channels, dtype=torch.int64).reshape(1, 1, 1, channels) * nseg
    seg = (torch.arange(tokens, dtype=torch.int64) // SEGMENT).reshape(1, 1, tokens, 1)
    return (block + chan + seg) * width
