"""TritonBackend: the cachegen stages as Triton kernels, returning exactly what CpuBackend returns.

Runs on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (the kernel tests do that). The stream
layout (layout.py) is mapped onto lanes so that consecutive lanes are consecutive channels: every
step of every kernel then reads and writes contiguous memory across a block.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton

from kvmesh.codecs.cachegen import delta, quant, rans
from kvmesh.codecs.cachegen import triton_quant as tq
from kvmesh.codecs.cachegen import triton_rans as tr
from kvmesh.codecs.cachegen.layout import StreamLayout
from kvmesh.codecs.cachegen.predict import LayerPredictor, part_scales, to_fixed
from kvmesh.codecs.cachegen.rounding import QueryProfile
from kvmesh.codecs.cachegen.tables import NUM_TABLES, alphabet_tables
from kvmesh.codecs.errors import CodecError


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class _Tables:
    """Packed encode/decode/cost tables for a set of alphabet sizes, with each size's offsets."""

    def __init__(self, alphabets: tuple[int, ...], device: torch.device, decode: bool = True) -> None:
        enc, dec, cost = [], [], []
        self.enc_off, self.dec_off, self.cost_off = {}, {}, {}
        e_pos = d_pos = c_pos = 0
        for b in alphabets:
            t = alphabet_tables(b)
            enc.append(tr.pack_encode_table(t.freq, t.cum))
            if decode:  # 4096 entries a table: an encoder of many alphabets goes without
                dec.append(tr.pack_decode_table(t.freq, t.cum, t.slot_to_symbol))
            cost.append(t.cost.astype(np.int64).ravel())
            self.enc_off[b], self.dec_off[b], self.cost_off[b] = e_pos, d_pos, c_pos
            e_pos += t.freq.size
            d_pos += t.slot_to_symbol.size
            c_pos += t.cost.size
        # 256 identity entries (f = 4096, c = 0) after the last table: a symbol >= its alphabet (only
        # from input the device pipeline rejects once at the end, e.g. NaN) then reads inside the array
        enc.append(np.full(256, 4096, np.int32))
        self.enc = torch.from_numpy(np.concatenate(enc)).to(device)
        self.dec = torch.from_numpy(np.concatenate(dec)).to(device) if decode else None
        if max(int(c.max()) for c in cost) * 256 >= 2**31:
            raise CodecError("cost table too large for the int32 cost sums of the Triton kernels")
        self.cost = torch.from_numpy(np.concatenate(cost).astype(np.int32)).to(device)
        # int32 [257] on the device: where each alphabet's tables start, indexed by the alphabet size
        # itself (for counts chosen on the device: the host never learns which tables a stream uses)
        at = np.zeros((2, 257), np.int32)
        for b in alphabets:
            at[:, b] = self.enc_off[b], self.cost_off[b]
        self.enc_at, self.cost_at = (torch.from_numpy(a.copy()).to(device) for a in at)


@functools.lru_cache(maxsize=8)
def _tables(alphabets: tuple[int, ...], device: str, decode: bool = True) -> _Tables:
    return _Tables(alphabets, torch.device(device), decode)


class _LayoutLanes:
    """Per-stream and per-lane arrays of a stream layout on one device."""

    def __init__(self, layout: StreamLayout, device: torch.device) -> None:
        L, T, C, nseg = layout.layers, layout.tokens, layout.channels, layout.nseg
        # lane j = ((b * nseg + seg) * C + c) with b = kv * L + layer; stream = (b * C + c) * nseg + seg
        b = torch.arange(2 * L, dtype=torch.int64).view(-1, 1, 1)
        seg = torch.arange(nseg, dtype=torch.int64).view(1, -1, 1)
        c = torch.arange(C, dtype=torch.int64).view(1, 1, -1)
        base = (b * T + seg * quant.SEGMENT) * C + c
        stream = (b * C + c) * nseg + seg
        self.lanes = tr.Lanes(base.reshape(-1).to(device), stream.reshape(-1).to(device), C)
        # The coders' lanes: coded stream j = ((b * nseg + seg) * (C / G) + grp), its channels grp*G .. grp*G + G - 1.
        G = layout.group
        grp = torch.arange(C // G, dtype=torch.int64).view(1, 1, -1)
        self.coded = tr.Lanes(((b * T + seg * quant.SEGMENT) * C + grp * G).reshape(-1).to(device),
                              ((b * (C // G) + grp) * nseg + seg).reshape(-1).to(device), C,
                              lane_model=((b * C + grp * G) * nseg + seg).reshape(-1).to(device), group=G,
                              model_step=nseg)
        # The same lanes split by alphabet size, for kernels whose work grows with the alphabet.
        lane_alpha = torch.from_numpy(np.asarray(layout.levels, dtype=np.int64).reshape(-1)).view(-1, 1, 1)
        lane_alpha = lane_alpha.expand(2 * L, nseg, C).reshape(-1)
        self.group_lanes = []
        for g, _ in layout.groups:
            pick = (lane_alpha == int(g)).to(device)
            lanes = tr.Lanes(self.lanes.lane_base[pick], self.lanes.lane_stream[pick], C)
            self.group_lanes.append((int(g), max(32, 1 << (int(g) - 1).bit_length()), lanes))
        self.lengths = torch.from_numpy(layout.lengths.astype(np.int32)).to(device)
        self.alpha = torch.from_numpy(layout.stream_levels.astype(np.int32)).to(device)
        self.alphabets = layout.alphabets
        tabs = _tables(self.alphabets, str(device))
        enc_off = np.zeros(layout.num_streams, np.int64)
        dec_off = np.zeros(layout.num_streams, np.int64)
        for g, rows in layout.groups:
            enc_off[rows], dec_off[rows] = tabs.enc_off[g], tabs.dec_off[g]
        self.tabs = tabs
        self.enc_off = torch.from_numpy(enc_off).to(device)
        self.dec_off = torch.from_numpy(dec_off).to(device)
        # Per-call constants kept on the device: a host-to-device copy synchronises the host with the queue.
        self.alphabet = torch.from_numpy(np.asarray(layout.levels, np.int64)).to(device)  # [2, L]
        self.group_rows = [(int(g), torch.from_numpy(rows).to(device)) for g, rows in layout.groups]
        self.coded_lengths = torch.from_numpy(layout.coded_lengths.astype(np.int32)).to(device)
        self._half_masks: dict[tuple[bool, bool], torch.Tensor] = {}
        self._layout = layout
        # The interpreter pays per step, so it loops only as far as the longest stream; compiled kernels
        # keep one specialisation (NMAX is a compile-time constant).
        longest = int(layout.lengths.max()) if layout.lengths.size else 0
        self.nmax = longest if device.type == "cpu" else quant.SEGMENT

    def half_mask(self, halves: tuple[bool, bool]) -> torch.Tensor:
        """bool [S] on the device: the streams that may be delta streams (delta.half_mask), cached."""
        m = self._half_masks.get(halves)
        if m is None:
            m = self._half_masks[halves] = torch.from_numpy(delta.half_mask(self._layout, halves)).to(self.alpha.device)
        return m

    def stream_costs(self, hist: torch.Tensor, center: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """delta.stream_costs_device with this layout's row indices already on the device."""
        dev = hist.device
        c, t = center.to(torch.int64), table.to(torch.int64)
        out = torch.zeros(self._layout.num_streams, dtype=torch.int64, device=dev)
        for b, r in self.group_rows:
            shift = torch.remainder(torch.arange(b, device=dev)[None, :] + c[r][:, None], b)
            hr = torch.gather(hist[r].to(torch.int64), 1, shift)
            out[r] = (hr * delta._cost_table(b, str(dev))[t[r]]).sum(dim=1)
        return out

    def table_offsets(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = table.to(torch.int64)
        enc = (self.enc_off + t * self.alpha).to(torch.int32)
        dec = (self.dec_off + t * rans.M).to(torch.int32)
        return enc, dec


class TritonBackend:
    name = "triton"

    def __init__(self, device: torch.device | str | None = None) -> None:
        if device is None:
            if torch.cuda.is_available() and not interpreting():
                device = torch.device("cuda")
            elif interpreting():
                device = torch.device("cpu")
            else:
                raise CodecError("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run on the CPU")
        self.device = torch.device(device)
        self.interpret = self.device.type == "cpu"
        self._lanes: dict[tuple, _LayoutLanes] = {}
        self._levels: dict[bytes, torch.Tensor] = {}

    def _levels_on_device(self, levels: np.ndarray) -> torch.Tensor:
        """fp32 [2, L] levels, cached: a host-to-device copy per call would stall the launch queue."""
        lv = np.ascontiguousarray(levels, dtype=np.float32)
        key = lv.tobytes() + bytes(str(lv.shape), "ascii")
        t = self._levels.get(key)
        if t is None:
            if len(self._levels) > 64:
                self._levels.clear()
            t = self._levels[key] = tq.levels_tensor(lv, self.device)
        return t

    def _layout(self, layout: StreamLayout) -> _LayoutLanes:
        key = (layout.layers, layout.tokens, layout.channels, layout.group, layout.levels.tobytes())
        lanes = self._lanes.get(key)
        if lanes is None:
            if len(self._lanes) > 32:
                self._lanes.clear()
            lanes = self._lanes[key] = _LayoutLanes(layout, self.device)
        return lanes

    def _dev(self, a: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(a, torch.Tensor):
            a = np.ascontiguousarray(a)
            # container sections arrive as read-only views of the blob; torch wants writable memory
            t = torch.from_numpy(a if a.flags.writeable else a.copy())
        else:
            t = a
        return t.to(device=self.device, dtype=dtype).contiguous()

    # -- quantization --------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, levels: np.ndarray, modes: tuple[int, int],
                 key_profile: QueryProfile | None = None) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """x [2, L, T, C] fp16/bf16/fp32 -> (q uint8 [2, L, T, C], [key side tensors, value side tensors]).

        Reads x in its own dtype: converting to fp32 first is exact, so it would only cost a pass.
        key_profile: the keys' symbols are rounded along it (triton_quant.round_keys: the same IEEE
        fp32 operations as the CPU's rounding, so the same symbols)."""
        x = x.to(self.device).contiguous()
        lv = self._levels_on_device(levels)
        q = torch.empty(x.shape, dtype=torch.uint8, device=self.device)
        _, sk = tq.quantize(x[0], lv[0], modes[0], self.interpret, q=q[0])
        _, sv = tq.quantize(x[1], lv[1], modes[1], self.interpret, q=q[1])
        if key_profile is not None:
            tq.round_keys(x[0], sk, lv[0], modes[0], key_profile, self.interpret, q=q[0])
        return q, [sk, sv]

    def quantize_half(self, x: torch.Tensor, levels: np.ndarray, mode: int, key_profile: QueryProfile | None = None
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One of K or V: x [L, T, C], levels [L] -> (q uint8 [L, T, C], side tensors)."""
        x = x.to(self.device).contiguous()
        lv = self._levels_on_device(np.asarray(levels).reshape(1, -1))[0]
        q, side = tq.quantize(x, lv, mode, self.interpret)
        if key_profile is not None:
            tq.round_keys(x, side, lv, mode, key_profile, self.interpret, q=q)
        return q, side

    def dequantize_half(self, q: torch.Tensor, side: list[torch.Tensor], levels: np.ndarray, mode: int,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """One of K or V: q uint8 [L, T, C] -> fp32 [L, T, C] (into out when given)."""
        lv = self._levels_on_device(np.asarray(levels).reshape(1, -1))[0]
        return tq.dequantize(q.to(self.device).contiguous(), [s.to(self.device) for s in side], lv, mode,
                             torch.float32, self.interpret, out=out)

    def predict(self, x: torch.Tensor, predictor: LayerPredictor, kv: int, layer: int) -> torch.Tensor:
        """predict.py's prediction of (kv, layer) from its features x fp32 [R, F] (same values as the CPU's)."""
        w, b = predictor.device_weights(kv, layer, self.device)
        return tq.predict(x.to(self.device, torch.float32).contiguous(), w, b, self.interpret)

    def to_fixed(self, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """predict.to_fixed on the device (torch ops: one amax read back for the scale)."""
        return to_fixed(y.to(self.device, torch.float32))

    def predict_fixed(self, parts: list[tuple[torch.Tensor, int]], predictor: LayerPredictor, kv: int,
                      layer: int) -> torch.Tensor:
        """The fixed-point prediction (predict.py) of (kv, layer) on the device (same values as the CPU's)."""
        w, sw, b = self.fixed_weights(predictor, kv, layer)
        x = torch.stack([t.to(self.device) for t, _ in parts])
        return tq.predict_fixed(x, w, part_scales([e for _, e in parts], sw), b, self.interpret)

    def fixed_weights(self, predictor: LayerPredictor, kv: int, layer: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W int16 [F, C], sw int32 [P, C], b fp32 [C]) of (kv, layer) on the device, made and copied
        once per predictor and device (cached on the predictor): a copy per chunk would synchronise."""
        cache = predictor.__dict__.setdefault("_device_fixed", {})
        key = (kv, layer, str(self.device))
        if key not in cache:
            w16, sw = predictor.fixed(kv, layer)
            cache[key] = (torch.from_numpy(w16).to(self.device), torch.from_numpy(sw).to(self.device),
                          predictor.device_weights(kv, layer, self.device)[1])
        return cache[key]

    def dequantize(self, q: torch.Tensor, sides: list[list[torch.Tensor]], levels: np.ndarray,
                   modes: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[2, L, T, C] in dtype (default fp32 like CpuBackend; any other dtype equals its .to(dtype))."""
        q = q.to(self.device).contiguous()
        lv = self._levels_on_device(levels)
        out = torch.empty(q.shape, dtype=dtype, device=self.device)
        for i in (0, 1):
            side = [s.to(self.device) for s in sides[i]]
            tq.dequantize(q[i], side, lv[i], modes[i], dtype, self.interpret, out=out[i])
        return out

    # -- statistics ----------------------------------------------------------------------------------
    def histogram(self, q: torch.Tensor, layout: StreamLayout) -> torch.Tensor:
        """int32 [S, 256] on the device: how often each symbol occurs in each stream."""
        ll = self._layout(layout)
        q = q.to(self.device).contiguous()
        hist = torch.zeros(layout.num_streams, 256, dtype=torch.int32, device=self.device)
        for g, bpad, lanes in ll.group_lanes:
            tr.stream_stats(q, lanes, ll.lengths, g, ll.tabs.cost_off[g], ll.tabs.cost, NUM_TABLES, ll.nmax, bpad,
                            hist=hist, write_hist=True, choose=False, interpret=self.interpret)
        return hist

    def choose_tables(self, hist: np.ndarray | torch.Tensor, layout: StreamLayout, with_cost: bool = False
                      ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As CpuBackend.choose_tables; the costs (with_cost) come from torch ops on the device."""
        center, table = self.choose_tables_device(hist, layout)
        if with_cost:
            cost = delta.stream_costs_device(self._dev(hist, torch.int32), center, table, layout)
            return center.cpu().numpy(), table.cpu().numpy(), cost.cpu().numpy()
        return center.cpu().numpy(), table.cpu().numpy()

    def choose_tables_device(self, hist: np.ndarray | torch.Tensor, layout: StreamLayout
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(center, table) uint8 [S] left on the device."""
        ll = self._layout(layout)
        h = self._dev(hist, torch.int32)
        center = torch.zeros(layout.num_streams, dtype=torch.uint8, device=self.device)
        table = torch.zeros(layout.num_streams, dtype=torch.uint8, device=self.device)
        for g, bpad, lanes in ll.group_lanes:
            tr.stream_stats(None, lanes, ll.lengths, g, ll.tabs.cost_off[g], ll.tabs.cost, NUM_TABLES, ll.nmax, bpad,
                            hist=h, choose=True, interpret=self.interpret, center_out=center, table_out=table)
        return center, table

    def stream_models(self, q: torch.Tensor, layout: StreamLayout, halves: tuple[bool, bool]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(center, table, delta flag) per stream, exactly as CpuBackend.stream_models."""
        center, table, flags = self.stream_models_device(q, layout, halves)
        return center.cpu().numpy(), table.cpu().numpy(), flags.cpu().numpy()

    def stream_models_device(self, q: torch.Tensor, layout: StreamLayout, halves: tuple[bool, bool]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The delta-stream choice (FORMAT.md section 4) on the device: two statistics passes (symbols, delta symbols), the
        integer costs by torch ops, and the choice, with no host synchronisation."""
        q = q.to(self.device).contiguous()
        if not any(halves):
            center, table = self.stats_device(q, layout)
            return center, table, torch.zeros(layout.num_streams, dtype=torch.bool, device=self.device)
        ll = self._layout(layout)
        hist = self.histogram(q, layout)
        center, table = self.choose_tables_device(hist, layout)
        hist_d = self.histogram(delta.forward(q, ll.alphabet), layout)
        center_d, table_d = self.choose_tables_device(hist_d, layout)
        flags = (ll.stream_costs(hist_d, center_d, table_d) < ll.stream_costs(hist, center, table)) & ll.half_mask(halves)
        return torch.where(flags, center_d, center), torch.where(flags, table_d, table), flags

    def stream_models_chosen(self, q: torch.Tensor, layout: StreamLayout, levels: torch.Tensor,
                             alphabets: tuple[int, ...], halves: tuple[bool, bool]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """stream_models_device for level counts a device chose (cross-layer prediction), never read by
        the host: levels int [2, L] on the device, alphabets every count they may hold, layout made from
        any counts (its lanes and lengths do not depend on them). Each statistics pass is ONE launch
        over streams of every alphabet (triton_rans.stream_stats_lanes), its least costs deciding the
        delta streams. Returns (center, table, delta flag, alphabet int32, encode table offset int32)
        per stream, the last two for rans_encode_chosen."""
        ll = self._layout(layout)
        tabs = _tables(alphabets, str(self.device), False)
        per = layout.channels * layout.nseg
        alpha = levels.to(torch.int32).reshape(-1).repeat_interleave(per)
        a64 = alpha.to(torch.int64)
        coff = tabs.cost_at[a64]
        bpad = triton.next_power_of_2(max(alphabets))
        q = q.contiguous()
        center, table, cost = tr.stream_stats_lanes(q, ll.lanes, ll.lengths, alpha, coff, tabs.cost, NUM_TABLES,
                                                    ll.nmax, bpad, self.interpret)
        flags = torch.zeros(layout.num_streams, dtype=torch.bool, device=self.device)
        if any(halves):
            cd, td, costd = tr.stream_stats_lanes(delta.forward(q, levels), ll.lanes, ll.lengths, alpha, coff,
                                                  tabs.cost, NUM_TABLES, ll.nmax, bpad, self.interpret)
            flags = (costd < cost) & ll.half_mask(halves)
            center, table = torch.where(flags, cd, center), torch.where(flags, td, table)
        enc_off = (tabs.enc_at[a64] + table.to(torch.int64) * a64).to(torch.int32)
        return center, table, flags, alpha, enc_off

    def rans_encode_chosen(self, q: torch.Tensor, center: torch.Tensor, alpha: torch.Tensor, enc_off: torch.Tensor,
                           layout: StreamLayout, alphabets: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """rans_encode_scratch with stream_models_chosen's per-stream alphabets and table offsets."""
        ll = self._layout(layout)
        tabs = _tables(alphabets, str(self.device), False)
        return tr.rans_encode_scratch(q.contiguous(), ll.coded, ll.lengths, center, alpha, enc_off, tabs.enc, ll.nmax,
                                      interpret=self.interpret)

    def stats(self, q: torch.Tensor, layout: StreamLayout) -> tuple[np.ndarray, np.ndarray]:
        """choose_tables(histogram(q)) in one pass that never writes the histogram out."""
        center, table = self.stats_device(q, layout)
        return center.cpu().numpy(), table.cpu().numpy()

    def stats_device(self, q: torch.Tensor, layout: StreamLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(center, table) uint8 [S] left on the device."""
        ll = self._layout(layout)
        q = q.to(self.device).contiguous()
        center = torch.zeros(layout.num_streams, dtype=torch.uint8, device=self.device)
        table = torch.zeros(layout.num_streams, dtype=torch.uint8, device=self.device)
        for g, bpad, lanes in ll.group_lanes:
            tr.stream_stats(q, lanes, ll.lengths, g, ll.tabs.cost_off[g], ll.tabs.cost, NUM_TABLES, ll.nmax, bpad,
                            choose=True, interpret=self.interpret, center_out=center, table_out=table)
        return center, table

    # -- entropy coding ------------------------------------------------------------------------------
    def rans_encode(self, q: torch.Tensor, center: np.ndarray, table: np.ndarray,
                    layout: StreamLayout, flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As CpuBackend.rans_encode; delta streams (flags) are transformed by torch ops on the device."""
        q = q.to(self.device)
        if flags is not None and np.any(flags):
            q = delta.forward(q, layout.levels, flags)
        words, counts = self.rans_encode_device(q, center, table, layout)
        return words.cpu().numpy(), counts.cpu().numpy()

    def rans_encode_device(self, q: torch.Tensor, center: np.ndarray | torch.Tensor, table: np.ndarray | torch.Tensor,
                           layout: StreamLayout) -> tuple[torch.Tensor, torch.Tensor]:
        scratch, counts, width = self.rans_encode_scratch(q, center, table, layout)
        return tr.compact(scratch, counts, width, self.interpret), counts

    def rans_encode_scratch(self, q: torch.Tensor, center: np.ndarray | torch.Tensor,
                            table: np.ndarray | torch.Tensor, layout: StreamLayout
                            ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The coder's output before compaction, without synchronising: (scratch uint16 [coded streams,
        width + 2] with each stream's words at the end of its row, words per coded stream int32, width)."""
        ll = self._layout(layout)
        q = q.to(self.device).contiguous()
        c = self._dev(center, torch.uint8)
        enc_off, _ = ll.table_offsets(self._dev(table, torch.int64))
        return tr.rans_encode_scratch(q, ll.coded, ll.lengths, c, ll.alpha, enc_off, ll.tabs.enc, ll.nmax,
                                      interpret=self.interpret)

    def layout_lanes(self, layout: StreamLayout) -> "_LayoutLanes":
        """The layout's per-stream and per-lane arrays on the device (cached)."""
        return self._layout(layout)

    def rans_decode(self, words: np.ndarray | torch.Tensor, counts: np.ndarray | torch.Tensor,
                    center: np.ndarray | torch.Tensor, table: np.ndarray | torch.Tensor,
                    layout: StreamLayout, flags: np.ndarray | None = None) -> torch.Tensor:
        """q uint8 [2, L, T, C] on the device; CodecError if any stream fails its end-state check.
        Delta streams (flags) are restored by torch ops on the device."""
        w = self._dev(np.asarray(words, dtype=np.uint16) if not isinstance(words, torch.Tensor) else words,
                      torch.uint16)
        cnt = self._dev(counts, torch.int32)
        # The kernel trusts each stream's [offset, offset + count) to lie inside the words.
        if cnt.numel() != layout.num_coded or (cnt.numel() and (
                int(cnt.min()) < 2 or int(cnt.to(torch.int64).sum()) != w.numel())):
            raise CodecError("corrupt cachegen container: stream word counts do not match the stored words")
        q, status = self.rans_decode_device(w, cnt, center, table, layout)
        bad = int((status == 0).sum())
        if bad:
            k = int(torch.nonzero(status == 0)[0, 0])
            raise CodecError(f"corrupt cachegen container: rANS stream {k} fails its end-state check "
                             f"({bad} of {layout.num_coded} streams)")
        if flags is not None and np.any(flags):
            q = delta.inverse(q, layout.levels, flags)
        return q

    def rans_decode_device(self, words: torch.Tensor, counts: torch.Tensor, center: np.ndarray | torch.Tensor,
                           table: np.ndarray | torch.Tensor, layout: StreamLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(q uint8 [2, L, T, C], status int8 [coded streams], 1 = stream valid) without synchronising.

        counts must already be validated (each >= 2, summing to the number of words)."""
        ll = self._layout(layout)
        c = self._dev(center, torch.uint8)
        _, dec_off = ll.table_offsets(self._dev(table, torch.int64))
        out = torch.empty(2, layout.layers, layout.tokens, layout.channels, dtype=torch.uint8, device=self.device)
        status = tr.rans_decode(words, counts, out, ll.coded, ll.lengths, c, ll.alpha, dec_off, ll.tabs.dec, ll.nmax,
                                interpret=self.interpret)
        return out, status
