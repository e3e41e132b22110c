"""Delta streams: a stream may code the differences between consecutive symbols instead of the symbols.

Keys change slowly from token to token in some channels (the low-frequency RoPE pairs), so for ~40%
of the key streams of a real chunk the differences cost fewer bits than the symbols themselves; for
values almost never. The encoder models every stream of the halves its level allows (Level.delta:
keys) both ways and keeps the cheaper one (by the same integer table cost that picks its table); bit 7
of the stream's table byte says which (FORMAT.md section 4, "Delta streams"). Containers written before delta streams existed never set that bit, so
they decode unchanged.

The transform is an integer map on the quantized symbols, done with torch ops on whatever device the
symbols are on, so every backend writes the same bytes:

    d[t] = q[t]                              at the first token of each 256-token segment
    d[t] = (q[t] - q[t-1] + B // 2) mod B    elsewhere

The stream then goes through the usual center/table/rANS stages unchanged (its median is ~B // 2, so
its residuals are the differences). The inverse is a running sum within each segment, mod B.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from kvmesh.codecs.cachegen.layout import StreamLayout
from kvmesh.codecs.cachegen.quant import SEGMENT
from kvmesh.codecs.cachegen.tables import NUM_TABLES, alphabet_tables

DELTA_FLAG = 0x80  # bit 7 of a stream's table byte: the stream holds d, not q
TABLE_MASK = 0x7F


def _alphabet(levels: np.ndarray | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """int32 [2, L, 1, 1]: the alphabet size B of each (K/V, layer), on like's device. A tensor already
    there (the Triton backend caches one per layout) spares a host-to-device copy, which synchronises."""
    if isinstance(levels, torch.Tensor) and levels.device == like.device:
        return levels.to(torch.int32).reshape(2, -1, 1, 1)
    return torch.as_tensor(np.asarray(levels, np.int64), device=like.device).to(torch.int32).reshape(2, -1, 1, 1)


def _element_flags(flags: np.ndarray | torch.Tensor | None, shape: torch.Size, device: torch.device
                   ) -> torch.Tensor | None:
    """bool [S] per stream (stream order of layout.py) -> bool [2, L, R, C] per element (None: all)."""
    if flags is None:
        return None
    _, L, R, C = shape
    nseg = -(-R // SEGMENT)
    if isinstance(flags, torch.Tensor):
        f = flags.to(device=device, dtype=torch.bool)
    else:
        f = torch.from_numpy(np.ascontiguousarray(flags, dtype=bool)).to(device)
    per_seg = f.reshape(2, L, C, nseg).permute(0, 1, 3, 2)  # [2, L, nseg, C]
    return per_seg.repeat_interleave(SEGMENT, dim=2)[:, :, :R]


def forward(q: torch.Tensor, levels: np.ndarray, flags: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """q uint8 [2, L, R, C] (symbols < B of their layer) -> the symbols the streams carry: d for the
    streams flagged in flags (bool [S]; None = every stream), q for the others. (The compiled coder
    does the same inside its statistics, encode and decode loops.)"""
    b = _alphabet(levels, q)
    qi = q.to(torch.int32)
    d = torch.remainder(qi[:, :, 1:] - qi[:, :, :-1] + b // 2, b)
    d = torch.cat([qi[:, :, :1], d], dim=2)
    d[:, :, ::SEGMENT] = qi[:, :, ::SEGMENT]  # each segment (stream) starts from its first symbol
    d = d.to(torch.uint8)
    on = _element_flags(flags, q.shape, q.device)
    return d if on is None else torch.where(on, d, q)


def inverse(d: torch.Tensor, levels: np.ndarray, flags: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of forward with the same flags: d uint8 [2, L, R, C] -> q uint8 [2, L, R, C]."""
    two, L, R, C = d.shape
    b = _alphabet(levels, d)
    e = d.to(torch.int32) - b // 2
    e[:, :, ::SEGMENT] = d[:, :, ::SEGMENT].to(torch.int32)
    nseg = -(-R // SEGMENT)
    pad = nseg * SEGMENT - R
    if pad:
        e = torch.cat([e, e.new_zeros(two, L, pad, C)], dim=2)
    s = torch.cumsum(e.reshape(two, L, nseg, SEGMENT, C), dim=3, dtype=torch.int32).reshape(two, L, nseg * SEGMENT, C)
    q = torch.remainder(s[:, :, :R], b).to(torch.uint8)
    on = _element_flags(flags, d.shape, d.device)
    return q if on is None else torch.where(on, q, d)


@functools.lru_cache(maxsize=64)
def _cost_table(b: int, device: str) -> torch.Tensor:
    return torch.from_numpy(alphabet_tables(b).cost.astype(np.int64)).to(device)


def stream_costs(hist: np.ndarray | torch.Tensor, center: np.ndarray | torch.Tensor, table: np.ndarray | torch.Tensor,
                 layout: StreamLayout) -> np.ndarray:
    """int64 [S]: each stream's integer cost (1/256 bit) with its center and table (FORMAT.md section 4)."""
    return stream_costs_device(hist, center, table, layout).cpu().numpy()


def stream_costs_device(hist: np.ndarray | torch.Tensor, center: np.ndarray | torch.Tensor,
                        table: np.ndarray | torch.Tensor, layout: StreamLayout) -> torch.Tensor:
    """stream_costs as an int64 tensor on hist's device (no host synchronisation)."""
    h = torch.as_tensor(hist)
    dev = h.device
    c = torch.as_tensor(center).to(device=dev, dtype=torch.int64)
    t = torch.as_tensor(table).to(device=dev, dtype=torch.int64)
    out = torch.zeros(layout.num_streams, dtype=torch.int64, device=dev)
    for b, rows in layout.groups:
        r = torch.from_numpy(rows).to(dev)
        shift = torch.remainder(torch.arange(b, device=dev)[None, :] + c[r][:, None], b)
        hr = torch.gather(h[r].to(torch.int64), 1, shift)
        out[r] = (hr * _cost_table(b, str(dev))[t[r]]).sum(dim=1)
    return out

if NUM_TABLES > TABLE_MASK + 1:  # pragma: no cover - a guard for whoever grows the table family
    raise ImportError("delta streams need table indices below 128: bit 7 of the table byte is the flag")


def half_mask(layout: StreamLayout, halves: tuple[bool, bool]) -> np.ndarray:
    """bool [S]: the streams of the halves (K, V) that may be delta streams (K's streams come first)."""
    per_half = layout.num_streams // 2
    return np.repeat(np.asarray(halves, dtype=bool), per_half)
