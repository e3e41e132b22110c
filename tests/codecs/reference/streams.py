"""The numpy reference's view of streams (FORMAT.md section 4): model streams as rows [S, SEGMENT],
coded streams as interleaved rows, and every alphabet's tables merged for one rans.py call. The
compiled coder and the Triton kernels read the streams in place instead."""
from __future__ import annotations

import functools

import numpy as np
import torch

from kvmesh.codecs.cachegen import rans
from kvmesh.codecs.cachegen.layout import StreamLayout
from kvmesh.codecs.cachegen.quant import SEGMENT, num_segments
from kvmesh.codecs.cachegen.tables import NUM_TABLES, alphabet_tables


def to_streams(q: torch.Tensor, nseg: int) -> torch.Tensor:
    """[2, L, T, C] -> [S, SEGMENT] (positions past the chunk's end are 0)."""
    _, L, T, C = q.shape
    pad = nseg * SEGMENT - T
    if pad:
        q = torch.cat([q, q.new_zeros(2, L, pad, C)], dim=2)
    return q.reshape(2, L, nseg, SEGMENT, C).permute(0, 1, 4, 2, 3).reshape(-1, SEGMENT)


def interleave(sym: np.ndarray, layout: StreamLayout) -> np.ndarray:
    """Model-stream symbols [S, SEGMENT] -> coded-stream symbols [S / G, SEGMENT * G], channel-minor
    within each token."""
    return np.ascontiguousarray(sym[layout.members].transpose(0, 2, 1)).reshape(layout.num_coded, -1)


def deinterleave(coded: np.ndarray, layout: StreamLayout) -> np.ndarray:
    """Inverse of interleave: [S / G, SEGMENT * G] -> [S, SEGMENT]."""
    out = np.empty((layout.num_streams, coded.shape[1] // layout.group), coded.dtype)
    out[layout.members] = coded.reshape(layout.num_coded, -1, layout.group).transpose(0, 2, 1)
    return out


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


@functools.lru_cache(maxsize=32)
def merged_tables(alphabets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, int]]:
    """The table families of several alphabets in one (freq, cum, slot_to_symbol) set, each padded
    with zero frequencies to the largest alphabet (rans.py accepts that), and each alphabet's first
    table index: one rans.encode/decode call then codes streams of every alphabet at once."""
    width = max(alphabets)
    freq = np.zeros((NUM_TABLES * len(alphabets), width), np.int64)
    first = {}
    for i, b in enumerate(alphabets):
        freq[i * NUM_TABLES:(i + 1) * NUM_TABLES, :b] = alphabet_tables(b).freq
        first[b] = i * NUM_TABLES
    cum, slot_to_symbol = rans.build_tables(freq)
    return freq, cum, slot_to_symbol, first
