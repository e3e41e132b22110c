"""ReferenceBackend: every cachegen stage in numpy/torch, with CpuBackend's interface.

``CacheGenCodec(level, ReferenceBackend())`` writes and reads the same bytes as the compiled CPU path
and the Triton kernels: the tests hold all three to that.
"""
from __future__ import annotations

import numpy as np
import torch

from kvmesh.codecs.cachegen import delta as _delta
from kvmesh.codecs.cachegen import quant, rans
from kvmesh.codecs.cachegen.backends import CpuBackend, SideTensors
from kvmesh.codecs.cachegen.layout import StreamLayout
from kvmesh.codecs.cachegen.predict import LayerPredictor
from kvmesh.codecs.cachegen.rounding import QueryProfile
from kvmesh.codecs.cachegen.tables import alphabet_tables
from kvmesh.codecs.errors import CodecError

from .predict import predict_fixed_reference, predict_reference, to_fixed_reference
from .rounding import quantize_keys
from .streams import deinterleave, element_stream_ids, from_streams, interleave, merged_tables, to_streams


def _merged_table_index(table: np.ndarray, layout: StreamLayout, first: dict[int, int]) -> np.ndarray:
    """int64 [S / G, G]: each coded stream's members' table indices into merged_tables."""
    offset = np.zeros(layout.num_streams, np.int64)
    for b, rows in layout.groups:
        offset[rows] = first[b]
    return (np.asarray(table, np.int64) + offset)[layout.members]


def stream_models(backend: object, q: torch.Tensor, layout: StreamLayout, halves: tuple[bool, bool]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(center uint8 [S], table uint8 [S], delta flag bool [S]) from a backend's histogram and
    choose_tables stages: every stream modelled as its symbols and, for the halves (K, V) allowed,
    as a delta stream, keeping the delta stream where its least integer cost is strictly lower (ties:
    the symbols)."""
    hist = backend.histogram(q, layout)
    center, table, cost = (np.asarray(a) for a in backend.choose_tables(hist, layout, with_cost=True))
    flags = np.zeros(layout.num_streams, dtype=bool)
    if not any(halves):
        return center.astype(np.uint8), table.astype(np.uint8), flags
    hist_d = backend.histogram(_delta.forward(q, layout.levels), layout)
    center_d, table_d, cost_d = (np.asarray(a) for a in backend.choose_tables(hist_d, layout, with_cost=True))
    flags = (cost_d < cost) & _delta.half_mask(layout, halves)
    return (np.where(flags, center_d, center).astype(np.uint8), np.where(flags, table_d, table).astype(np.uint8),
            flags)


def protected_rows(x: torch.Tensor, thresholds: tuple[float, float]) -> torch.Tensor:
    """bool [2, L, R]: codec.protected_rows' rule (FORMAT.md section 3) with float64 torch sums."""
    mask = torch.zeros(x.shape[:3], dtype=torch.bool, device=x.device)
    for kv, threshold in enumerate(thresholds):
        if threshold <= 0:
            continue
        s = torch.abs(x[kv].to(torch.float16)).sum(dim=2, dtype=torch.float64)  # [L, R]
        ref = torch.median(s, dim=1, keepdim=True).values
        mask[kv] = s < float(threshold) * ref
    return mask


class ReferenceBackend(CpuBackend):
    name = "reference"
    # the stage-by-stage loop of codec.py, not CpuBackend's fused steps, runs the prediction
    quantize_predicted = None
    add_predictions = None

    def quantize_half(self, x: torch.Tensor, levels: np.ndarray, mode: int, key_profile: QueryProfile | None = None
                      ) -> tuple[torch.Tensor, SideTensors]:
        lv = torch.from_numpy(np.asarray(levels).astype(np.float32))
        x = x.to(torch.float32).contiguous()
        if key_profile is not None:
            side = quant.quantize_params(x, lv, mode)[0]
            return quantize_keys(x, side, lv, mode, key_profile), side
        return quant.quantize(x, lv, mode)

    def dequantize_half(self, q: torch.Tensor, side: SideTensors, levels: np.ndarray, mode: int,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        y = quant.dequantize(q, side, torch.from_numpy(np.asarray(levels).astype(np.float32)), mode)
        if out is None:
            return y
        out.copy_(y)
        return out

    def predict(self, x: torch.Tensor, predictor: LayerPredictor, kv: int, layer: int) -> torch.Tensor:
        w, b = predictor.weights(kv, layer)
        return predict_reference(x.contiguous(), torch.from_numpy(w), torch.from_numpy(b))

    def to_fixed(self, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        x, sx = to_fixed_reference(y.cpu().numpy())
        return torch.from_numpy(x), sx

    def predict_fixed(self, parts: list[tuple[torch.Tensor, int]], predictor: LayerPredictor, kv: int,
                      layer: int) -> torch.Tensor:
        w, sw = predictor.fixed(kv, layer)
        out = predict_fixed_reference([(x.numpy(), sx) for x, sx in parts], w, sw, predictor.weights(kv, layer)[1])
        return torch.from_numpy(out)

    def histogram(self, q: torch.Tensor, layout: StreamLayout) -> np.ndarray:
        width = layout.max_levels  # count over the used alphabet only, then widen to 256 columns
        ids = element_stream_ids(layout.layers, layout.tokens, layout.channels, width)
        idx = (ids + q.to(torch.int64)).reshape(-1)
        counts = torch.bincount(idx, minlength=layout.num_streams * width).reshape(-1, width).numpy()
        if width == 256:
            return counts
        hist = np.zeros((layout.num_streams, 256), np.int64)
        hist[:, :width] = counts
        return hist

    def choose_tables(self, hist: np.ndarray, layout: StreamLayout, with_cost: bool = False
                      ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        S = hist.shape[0]
        table = np.zeros(S, np.int64)
        least = np.zeros(S, np.int64)
        cum = np.cumsum(hist[:, : layout.max_levels], axis=1)
        n = layout.lengths.astype(np.int64)
        # median: the smallest m with 2 * cum[m] >= n
        center = np.argmax(2 * cum >= n[:, None], axis=1)
        for b, rows in layout.groups:
            tabs = alphabet_tables(b)
            m = center[rows]
            shift = (np.arange(b)[None, :] + m[:, None]) % b
            hr = np.take_along_axis(hist[rows], shift, axis=1)
            # exact: integer-valued float64 products and sums stay far below 2**53
            cost = hr.astype(np.float64) @ tabs.cost.T.astype(np.float64)
            table[rows] = np.argmin(cost, axis=1)
            least[rows] = cost.min(axis=1).astype(np.int64)
        if with_cost:
            return center.astype(np.uint8), table.astype(np.uint8), least
        return center.astype(np.uint8), table.astype(np.uint8)

    def stream_models(self, q: torch.Tensor, layout: StreamLayout, halves: tuple[bool, bool]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return stream_models(self, q, layout, halves)

    def rans_encode(self, q: torch.Tensor, center: np.ndarray, table: np.ndarray,
                    layout: StreamLayout, flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if flags is not None and np.any(flags):
            q = _delta.forward(q, layout.levels, flags)
        sym = to_streams(q, layout.nseg).numpy()
        center = np.asarray(center)
        lev = layout.stream_levels[:, None].astype(np.int16)
        r = ((sym.astype(np.int16) - center[:, None].astype(np.int16) + lev) % lev).astype(np.uint8)
        # one call for every alphabet: the numpy loop's cost is per symbol position, not per stream
        freq, cum, _, first = merged_tables(layout.alphabets)
        tab = _merged_table_index(table, layout, first)
        words, counts = rans.encode(interleave(r, layout), layout.coded_lengths, tab, freq, cum)
        return words, counts.astype(np.int32)

    def rans_decode(self, words: np.ndarray, counts: np.ndarray, center: np.ndarray, table: np.ndarray,
                    layout: StreamLayout, flags: np.ndarray | None = None) -> torch.Tensor:
        S = layout.num_coded
        counts = counts.astype(np.int64)
        if counts.shape != (S,) or int(counts.sum()) != words.size:
            raise CodecError(f"corrupt rANS data: {counts.size} word counts adding up to {int(counts.sum())} "
                             f"for {S} streams and {words.size} words")
        freq, cum, slot_to_symbol, first = merged_tables(layout.alphabets)
        coded = rans.decode(words, counts, layout.coded_lengths, _merged_table_index(table, layout, first), freq, cum,
                            slot_to_symbol, quant.SEGMENT * layout.group)
        r = deinterleave(coded, layout)
        b = layout.stream_levels[:, None].astype(np.int16)
        sym = ((r.astype(np.int16) + np.asarray(center)[:, None]) % b).astype(np.uint8)
        q = from_streams(torch.from_numpy(sym), layout.layers, layout.tokens, layout.channels, layout.nseg)
        if flags is not None and np.any(flags):
            q = _delta.inverse(q, layout.levels, flags)
        return q
