"""How a chunk's symbols are cut into streams.

*Model stream* k = ((kv * L + layer) * C + channel) * nseg + segment: the symbols of one channel of one
layer of K or V over one segment of up to SEGMENT (256) tokens, in token order. Each has its own
center, table and delta flag (section 4).

*Coded stream* k' = ((kv * L + layer) * (C / G) + group) * nseg + segment: one rANS state over the G
adjacent channels group*G .. group*G + G - 1 of that segment, token by token (symbol i is token i // G of
channel group*G + i % G, coded with that channel's model). Sharing a state spares G - 1 of every G
streams' start state, final flush and word count: ~24 bits each. Short streams keep a long chunk from
becoming a long serial loop: a GPU thread (or a numpy lane) runs each coded stream.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

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
    group: int = 1  # G: channels per coded stream

    @property
    def num_streams(self) -> int:
        """Model streams (S)."""
        return int(self.lengths.size)

    @property
    def num_coded(self) -> int:
        """Coded streams (S / G)."""
        return self.num_streams // self.group

    @functools.cached_property
    def members(self) -> np.ndarray:
        """int64 [S / G, G]: the model streams of each coded stream, in channel order."""
        G, nseg = self.group, self.nseg
        k = np.arange(self.num_coded, dtype=np.int64)[:, None]
        return ((k // nseg) * G + np.arange(G, dtype=np.int64)[None, :]) * nseg + k % nseg

    @functools.cached_property
    def coded_lengths(self) -> np.ndarray:
        """int32 [S / G]: symbols per coded stream."""
        return (self.lengths[self.members[:, 0]] * self.group).astype(np.int32)

    @property
    def alphabets(self) -> tuple[int, ...]:
        """The alphabet sizes B present, ascending."""
        return tuple(b for b, _ in self.groups)

    @property
    def max_levels(self) -> int:
        return int(self.levels.max())


MAX_GROUP = 4  # the G writers use (at most)
MAX_CODED_GROUP = 8  # the G readers accept (FORMAT.md §2; _ransc.c's MAX_GROUP)


def channel_group(channels: int) -> int:
    """G for a channel count: the largest power of two <= MAX_GROUP dividing it."""
    g = MAX_GROUP
    while channels % g:
        g //= 2
    return g


def stream_layout(layers: int, tokens: int, channels: int, levels: np.ndarray, group: int = 1) -> StreamLayout:
    if group < 1 or channels % group:
        raise ValueError(f"{group} channels per coded stream do not divide {channels} channels")
    nseg = num_segments(tokens)
    per_block = channels * nseg  # streams per (kv, layer)
    stream_levels = np.repeat(levels.reshape(-1), per_block).astype(np.int64)
    seg_len = np.minimum(SEGMENT, tokens - np.arange(nseg) * SEGMENT).astype(np.int32)
    lengths = np.tile(seg_len, 2 * layers * channels)
    groups = tuple((int(b), np.flatnonzero(stream_levels == b)) for b in np.unique(stream_levels))
    return StreamLayout(layers, tokens, channels, nseg, levels, stream_levels, lengths, groups, group)
