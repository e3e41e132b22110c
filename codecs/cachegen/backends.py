"""The cachegen pipeline stages behind one small interface, so the Triton backend can replace each.

CpuBackend is the reference: torch/numpy, vectorised across streams. TritonBackend (in
triton_backend.py) has the same methods and must return identical values (and so identical bytes).

CpuBackend runs the per-symbol stages (histogram, table choice, rANS encode/decode) in the compiled
coder (native.py, _ransc.c) when it is built, byte-identical to the numpy code here, which stays
as the reference and the fallback. ``CpuBackend(native=False)`` or ``KVMESH_NATIVE=0`` forces numpy.
"""
from __future__ import annotations

import numpy as np
import torch

from kvmesh.codecs.cachegen import delta as _delta
from kvmesh.codecs.cachegen import native as _native
from kvmesh.codecs.cachegen import quant, rans
from kvmesh.codecs.cachegen.layout import (StreamLayout, deinterleave, element_stream_ids, from_streams, interleave,
                                         to_streams)
from kvmesh.codecs.cachegen.predict import LayerPredictor, predict_cpu
from kvmesh.codecs.cachegen.rounding import QueryProfile, quantize_keys
from kvmesh.codecs.cachegen.tables import alphabet_tables, merged_tables
from kvmesh.codecs.errors import CodecError


def _merged_table_index(table: np.ndarray, layout: StreamLayout, first: dict[int, int]) -> np.ndarray:
    """int64 [S / G, G]: each coded stream's members' table indices into tables.merged_tables."""
    offset = np.zeros(layout.num_streams, np.int64)
    for b, rows in layout.groups:
        offset[rows] = first[b]
    return (np.asarray(table, np.int64) + offset)[layout.members]


class CpuBackend:
    name = "cpu"
    device = torch.device("cpu")

    def __init__(self, native: bool | None = None) -> None:
        """native: None follows KVMESH_NATIVE (default on where built); True requires the compiled
        coder (CodecError if missing); False always runs the numpy reference."""
        self.native = _native.use_native(native)

    @staticmethod
    def _u8(q: torch.Tensor) -> np.ndarray:
        # the quantizer already returns contiguous CPU uint8: no copy in the usual case
        return q.detach().cpu().contiguous().numpy()

    def quantize(self, x: torch.Tensor, levels: np.ndarray, modes: tuple[int, int],
                 key_profile: QueryProfile | None = None) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """x fp32 [2, L, T, C] -> (q uint8 [2, L, T, C], [key side tensors, value side tensors]).
        key_profile: the keys' symbols are rounded along it (rounding.py); same grid and side tensors."""
        x = x.to(torch.float32).contiguous()
        qk, sk = self.quantize_half(x[0], levels[0], modes[0], key_profile)
        qv, sv = self.quantize_half(x[1], levels[1], modes[1])
        return torch.stack([qk, qv]), [sk, sv]

    def quantize_half(self, x: torch.Tensor, levels: np.ndarray, mode: int, key_profile: QueryProfile | None = None
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One of K or V: x fp32 [L, T, C], levels [L] -> (q uint8 [L, T, C], side tensors)."""
        lv = torch.from_numpy(np.asarray(levels).astype(np.float32))
        x = x.to(torch.float32).contiguous()
        if key_profile is not None:
            side = quant.quantize_params(x, lv, mode)[0]
            return quantize_keys(x, side, lv, mode, key_profile, native=self.native), side
        if not self.native:
            return quant.quantize(x, lv, mode)
        # the per-group part in torch, the elementwise part in one compiled pass (same values)
        side, lo, inv, bm1 = quant.quantize_params(x, lv, mode)
        per_channel = mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP)
        return _native.quantize(x, lo, inv, bm1, per_channel), side

    def dequantize(self, q: torch.Tensor, sides: list[list[torch.Tensor]], levels: np.ndarray,
                   modes: tuple[int, int]) -> torch.Tensor:
        q = q.contiguous()
        out = torch.empty(q.shape, dtype=torch.float32)
        for i in (0, 1):
            self.dequantize_half(q[i], sides[i], levels[i], modes[i], out=out[i])
        return out

    def dequantize_half(self, q: torch.Tensor, side: list[torch.Tensor], levels: np.ndarray, mode: int,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """One of K or V: q uint8 [L, T, C] -> fp32 [L, T, C] (into out when given)."""
        lv = torch.from_numpy(np.asarray(levels).astype(np.float32))
        if not self.native:
            y = quant.dequantize(q, side, lv, mode)
            if out is None:
                return y
            out.copy_(y)
            return out
        lo, step = quant.dequantize_params(side, lv, mode)
        return _native.dequantize(q.contiguous(), lo, step, mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP),
                                  out=out)

    def predict(self, x: torch.Tensor, predictor: LayerPredictor, kv: int, layer: int) -> torch.Tensor:
        """predict.py's prediction of (kv, layer) from its features x fp32 [R, F]: fp32 [R, C]."""
        w, b = predictor.weights(kv, layer)
        return predict_cpu(x.contiguous(), w, b, self.native)

    def histogram(self, q: torch.Tensor, layout: StreamLayout) -> np.ndarray:
        """int64 [S, 256]: how often each symbol occurs in each stream."""
        if self.native:
            return _native.histogram(self._u8(q), layout)
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
        """(center uint8 [S], table uint8 [S]) per FORMAT.md: the median symbol, then the table of
        least integer cost for the residuals (ties: the lowest index); with_cost adds that least
        cost per stream (int64 [S], 1/256 bit)."""
        if self.native:
            return _native.choose_tables(hist, layout, with_cost)
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
        """(center, table, delta flag) per stream: delta.stream_models (halves: (K, V) may use delta
        streams), fused in one pass when native."""
        if self.native:
            return _native.models(self._u8(q), layout, halves)
        return _delta.stream_models(self, q, layout, halves)

    def rans_encode(self, q: torch.Tensor, center: np.ndarray, table: np.ndarray,
                    layout: StreamLayout, flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Codes residual r = (q - center) mod B of every stream; (words uint16, words per coded stream).
        Streams flagged in flags (bool [S]) are delta streams: they code delta.forward's symbols."""
        if self.native:
            return _native.encode(self._u8(q), np.asarray(center), np.asarray(table), layout, flags)
        if flags is not None and np.any(flags):
            q = _delta.forward(q, layout.levels, flags)
        sym = to_streams(q, layout.nseg).numpy()
        center = np.asarray(center)
        r = ((sym.astype(np.int16) - center[:, None].astype(np.int16) + layout.stream_levels[:, None].astype(np.int16))
             % layout.stream_levels[:, None].astype(np.int16)).astype(np.uint8)
        # one call for every alphabet: the numpy loop's cost is per symbol position, not per stream
        freq, cum, _, first = merged_tables(layout.alphabets)
        tab = _merged_table_index(table, layout, first)
        words, counts = rans.encode(interleave(r, layout), layout.coded_lengths, tab, freq, cum)
        return words, counts.astype(np.int32)

    def rans_decode(self, words: np.ndarray, counts: np.ndarray, center: np.ndarray, table: np.ndarray,
                    layout: StreamLayout, flags: np.ndarray | None = None) -> torch.Tensor:
        """Inverse of rans_encode (with the same flags): q uint8 [2, L, T, C]; CodecError on a corrupt stream."""
        if self.native:
            return torch.from_numpy(_native.decode(words, counts, np.asarray(center), np.asarray(table), layout, flags))
        q = self._rans_decode_numpy(words, counts, center, table, layout)
        if flags is not None and np.any(flags):
            q = _delta.inverse(q, layout.levels, flags)
        return q

    def _rans_decode_numpy(self, words: np.ndarray, counts: np.ndarray, center: np.ndarray, table: np.ndarray,
                           layout: StreamLayout) -> torch.Tensor:
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
        return from_streams(torch.from_numpy(sym), layout.layers, layout.tokens, layout.channels, layout.nseg)
