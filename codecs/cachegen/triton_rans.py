"""Triton kernels for kvmesh-rans32x16 (see rans.py for the format) and the per-stream statistics.

One lane is one stream. The kernels never see the stream layout itself: the host describes every lane
by where its first symbol lies in the symbol tensor (``lane_base``), the distance between consecutive
symbols (``sym_step``) and which stream it is (``lane_stream``). For the cachegen layout consecutive
lanes are consecutive channels, so at every step a block's symbol loads and stores are contiguous.

Per stream the kernels read: its length, its alphabet size ``B``, its centre symbol (coded symbols are
residuals ``r = (q - centre) mod B``) and the offset of its table in a packed table array:
- encode table entries: ``f | c << 13`` (int32) for each (table, residual);
- decode table entries: ``sym | (f - 1) << 8 | (slot - c) << 20`` (uint32 bits in an int32) for each
  (table, slot), 4096 per table;
- cost table entries: the integer cost of each (table, residual).

Encode writes each stream's words from the top of its own scratch row down (rANS emits them in reverse
order), then ``compact`` packs the rows by the prefix sum of the word counts.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

PROB_BITS = tl.constexpr(12)
RANS_L = tl.constexpr(1 << 16)


@triton.jit
def _rans_encode_kernel(sym_ptr, lane_base_ptr, lane_stream_ptr, lane_model_ptr, len_ptr, center_ptr, alpha_ptr,
                        tab_off_ptr, enc_tab_ptr, scratch_ptr, count_ptr, n_lanes, sym_step, model_step,
                        NMAX: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = lane < n_lanes
    base = tl.load(lane_base_ptr + lane, mask=valid, other=0)
    k = tl.load(lane_stream_ptr + lane, mask=valid, other=0)
    km = tl.load(lane_model_ptr + lane, mask=valid, other=0)
    n = tl.load(len_ptr + km, mask=valid, other=0)
    alpha = tl.load(alpha_ptr + km, mask=valid, other=1)
    row = k.to(tl.int64) * (NMAX * G + 2)
    x = tl.full([BLOCK], RANS_L, tl.uint32)
    ptr = tl.full([BLOCK], NMAX * G + 1, tl.int32)
    for j in range(NMAX):
        i = NMAX - 1 - j
        act = valid & (i < n)
        for uu in tl.static_range(G):
            u = G - 1 - uu  # symbol i * G + u of the coded stream: token i of member channel u
            center = tl.load(center_ptr + km + u * model_step, mask=act, other=0).to(tl.int32)
            toff = tl.load(tab_off_ptr + km + u * model_step, mask=act, other=0)
            s = tl.load(sym_ptr + base + i * sym_step + u, mask=act, other=0).to(tl.int32)
            r = s - center
            r = tl.where(r < 0, r + alpha, r)
            # Inactive positions get f = 4096, c = 0: the identity update, and never a renormalisation.
            e = tl.load(enc_tab_ptr + toff + r, mask=act, other=4096)
            f = (e & 8191).to(tl.uint32)
            c = (e >> 13).to(tl.uint32)
            # x >= f << 20, written so that f = 4096 cannot overflow 32 bits.
            emit = (x >> 20) >= f
            tl.store(scratch_ptr + row + ptr, (x & 0xFFFF).to(tl.uint16), mask=emit)
            ptr = ptr - emit.to(tl.int32)
            x = tl.where(emit, x >> 16, x)
            q = x // f
            x = (q << 12) + (x - q * f) + c
    tl.store(scratch_ptr + row + ptr, (x & 0xFFFF).to(tl.uint16), mask=valid)
    tl.store(scratch_ptr + row + ptr - 1, (x >> 16).to(tl.uint16), mask=valid)
    tl.store(count_ptr + k, NMAX * G + 3 - ptr, mask=valid)


@triton.jit
def _compact_kernel(scratch_ptr, count_ptr, offset_ptr, out_ptr, n_streams,
                    NMAX: tl.constexpr, ROWS: tl.constexpr, WBLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < n_streams
    cnt = tl.load(count_ptr + rows, mask=valid, other=0)
    off = tl.load(offset_ptr + rows, mask=valid, other=0)
    w = tl.arange(0, WBLOCK)
    m = valid[:, None] & (w[None, :] < cnt[:, None])
    src = rows.to(tl.int64)[:, None] * (NMAX + 2) + (NMAX + 2 - cnt)[:, None] + w[None, :]
    vals = tl.load(scratch_ptr + src, mask=m, other=0)
    tl.store(out_ptr + off[:, None] + w[None, :], vals, mask=m)


@triton.jit
def _rans_decode_kernel(words_ptr, offset_ptr, count_ptr, out_ptr, lane_base_ptr, lane_stream_ptr, lane_model_ptr,
                        len_ptr, center_ptr, alpha_ptr, dtab_off_ptr, dec_tab_ptr, status_ptr, n_lanes, sym_step,
                        model_step, NMAX: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = lane < n_lanes
    base = tl.load(lane_base_ptr + lane, mask=valid, other=0)
    k = tl.load(lane_stream_ptr + lane, mask=valid, other=0)
    km = tl.load(lane_model_ptr + lane, mask=valid, other=0)
    n = tl.load(len_ptr + km, mask=valid, other=0)
    alpha = tl.load(alpha_ptr + km, mask=valid, other=1)
    start = tl.load(offset_ptr + k, mask=valid, other=0)
    cnt = tl.load(count_ptr + k, mask=valid, other=0)
    end = start + cnt
    bad = valid & (cnt < 2)
    w0 = tl.load(words_ptr + start, mask=valid & (cnt >= 2), other=0).to(tl.uint32)
    w1 = tl.load(words_ptr + start + 1, mask=valid & (cnt >= 2), other=0).to(tl.uint32)
    x = (w0 << 16) | w1
    ptr = start + 2
    for i in range(NMAX):
        act = valid & (i < n)
        for u in tl.static_range(G):
            center = tl.load(center_ptr + km + u * model_step, mask=act, other=0).to(tl.int32)
            doff = tl.load(dtab_off_ptr + km + u * model_step, mask=act, other=0)
            slot = (x & 4095).to(tl.int32)
            d = tl.load(dec_tab_ptr + doff + slot, mask=act, other=0).to(tl.uint32, bitcast=True)
            sym = (d & 255).to(tl.int32)
            f = ((d >> 8) & 4095) + 1
            xn = f * (x >> 12) + (d >> 20)
            need = act & (xn < RANS_L)
            can = need & (ptr < end)
            bad = bad | (need & (ptr >= end))
            w = tl.load(words_ptr + ptr, mask=can, other=0).to(tl.uint32)
            xn = tl.where(need, (xn << 16) | w, xn)
            ptr = ptr + need.to(tl.int64)
            x = tl.where(act, xn, x)
            s = sym + center
            s = tl.where(s >= alpha, s - alpha, s)
            tl.store(out_ptr + base + i * sym_step + u, s.to(tl.uint8), mask=act)
    ok = (~bad) & (x == RANS_L) & (ptr == end)
    tl.store(status_ptr + k, ok.to(tl.int8), mask=valid)


@triton.jit
def _stats_kernel(sym_ptr, lane_base_ptr, lane_stream_ptr, len_ptr, alpha, cost_off, cost_ptr,
                  hist_ptr, center_ptr, table_ptr, n_lanes, sym_step, alpha_ptr, coff_ptr, best_ptr,
                  NMAX: tl.constexpr, BLOCK: tl.constexpr, BPAD: tl.constexpr, NT: tl.constexpr,
                  FROM_HIST: tl.constexpr, WRITE_HIST: tl.constexpr, CHOOSE: tl.constexpr, DOT: tl.constexpr,
                  LANE_ALPHA: tl.constexpr = False):
    """Per-stream histogram of symbols (< BPAD), and/or the median centre and cheapest table, for lanes
    that share one alphabet size `alpha` (whose cost table starts at cost_off: [NT, alpha] int32).

    centre = the smallest m with 2 * (count of symbols <= m) >= n; table = argmin over t of
    sum_j hist[(j + m) mod B] * cost[t][j], ties to the lowest t.

    LANE_ALPHA: each stream's alphabet and cost table offset come from the device (alpha_ptr, coff_ptr
    per stream: level counts a device chose, never seen by the host), so lanes of any alphabets share
    one launch; the least cost goes to best_ptr too (the delta-stream choice compares it).
    """
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = lane < n_lanes
    k = tl.load(lane_stream_ptr + lane, mask=valid, other=0)
    n = tl.load(len_ptr + k, mask=valid, other=0)
    bins = tl.arange(0, BPAD)
    hrow = k.to(tl.int64)[:, None] * 256 + bins[None, :]
    if FROM_HIST:
        h = tl.load(hist_ptr + hrow, mask=valid[:, None], other=0).to(tl.int32)
    else:
        # Counts up to 256 need 9 bits: keep them bit-sliced, plane k holding bit k of every bin's
        # count (32 bins per uint32 word, NW words). Adding a symbol is a ripple-carry of its one-hot
        # word through the planes: 2 ops per plane instead of one compare-add per bin.
        NW: tl.constexpr = BPAD // 32
        words = tl.arange(0, NW)
        base = tl.load(lane_base_ptr + lane, mask=valid, other=0)
        p0 = tl.zeros([BLOCK, NW], tl.uint32)
        p1 = tl.zeros([BLOCK, NW], tl.uint32)
        p2 = tl.zeros([BLOCK, NW], tl.uint32)
        p3 = tl.zeros([BLOCK, NW], tl.uint32)
        p4 = tl.zeros([BLOCK, NW], tl.uint32)
        p5 = tl.zeros([BLOCK, NW], tl.uint32)
        p6 = tl.zeros([BLOCK, NW], tl.uint32)
        p7 = tl.zeros([BLOCK, NW], tl.uint32)
        p8 = tl.zeros([BLOCK, NW], tl.uint32)
        one = tl.full([BLOCK], 1, tl.uint32)
        for i in range(NMAX):
            act = valid & (i < n)
            s = tl.load(sym_ptr + base + i * sym_step, mask=act, other=0).to(tl.int32)
            bit = tl.where(act, one << (s & 31).to(tl.uint32), 0)
            c = tl.where(words[None, :] == (s >> 5)[:, None], bit[:, None], 0).to(tl.uint32)
            t = p0 & c
            p0 = p0 ^ c
            c = t
            t = p1 & c
            p1 = p1 ^ c
            c = t
            t = p2 & c
            p2 = p2 ^ c
            c = t
            t = p3 & c
            p3 = p3 ^ c
            c = t
            t = p4 & c
            p4 = p4 ^ c
            c = t
            t = p5 & c
            p5 = p5 ^ c
            c = t
            t = p6 & c
            p6 = p6 ^ c
            c = t
            t = p7 & c
            p7 = p7 ^ c
            c = t
            p8 = p8 ^ c
        sh = tl.arange(0, 32).to(tl.uint32)[None, None, :]
        h = tl.reshape(((p0[:, :, None] >> sh) & 1).to(tl.int32), (BLOCK, BPAD))
        h += tl.reshape(((p1[:, :, None] >> sh) & 1).to(tl.int32), (BLOCK, BPAD)) << 1
        h += tl.reshape(((p2[:, :, None] >> sh) & 1).to(tl.int32), (BLOCK, BPAD)) << 2
        h += tl.reshape(((p3[:, :, None] >> sh) & 1).to(tl.int32), (BLOCK, BPAD)) << 3
        h += tl.reshape(((p4[:, :, None] >> sh) & 1).to(tl.int32), (BLOCK, BPAD)) << 4
        h += tl.reshape(((p5[:, :, None] >> sh) & 1).to(tl.int32), (BLOCK, BPAD)) << 5
        h += tl.reshape(((p6[:, :, None] >> sh) & 1).to(tl.int32), (BLOCK, BPAD)) << 6
        h += tl.reshape(((p7[:, :, None] >> sh) & 1).to(tl.int32), (BLOCK, BPAD)) << 7
        h += tl.reshape(((p8[:, :, None] >> sh) & 1).to(tl.int32), (BLOCK, BPAD)) << 8
    if WRITE_HIST:
        tl.store(hist_ptr + hrow, h.to(hist_ptr.dtype.element_ty), mask=valid[:, None])
    if CHOOSE and LANE_ALPHA:
        cum = tl.cumsum(h, axis=1)
        m = tl.sum((2 * cum < n[:, None]).to(tl.int32), axis=1)
        a = tl.load(alpha_ptr + k, mask=valid, other=1)
        coff = tl.load(coff_ptr + k, mask=valid, other=0)
        inb = valid[:, None] & (bins[None, :] < a[:, None])
        idx = bins[None, :] - m[:, None]
        idx = tl.where(idx < 0, idx + a[:, None], idx)
        idx = tl.minimum(tl.maximum(idx, 0), a[:, None] - 1)  # (only input rejected at the end is outside)
        best = tl.full([BLOCK], 2147483647, tl.int32)
        choice = tl.zeros([BLOCK], tl.int32)
        for t in range(NT):
            c = tl.load(cost_ptr + coff[:, None] + t * a[:, None] + idx, mask=inb, other=0)
            total = tl.sum(h * c, axis=1)
            better = total < best
            best = tl.where(better, total, best)
            choice = tl.where(better, t, choice)
        tl.store(center_ptr + k, m.to(tl.uint8), mask=valid)
        tl.store(table_ptr + k, choice.to(tl.uint8), mask=valid)
        tl.store(best_ptr + k, best, mask=valid)
    elif CHOOSE:
        cum = tl.cumsum(h, axis=1)
        m = tl.sum((2 * cum < n[:, None]).to(tl.int32), axis=1)
        inb = bins < alpha
        if DOT:
            # Rotate each lane's histogram by its centre (a register gather), so that the cost table is
            # the same for every lane: all 64 table costs are then one [BLOCK, BPAD] x [BPAD, NT] product.
            idx = bins[None, :] + m[:, None]
            idx = tl.where(idx >= alpha, idx - alpha, idx)
            idx = tl.where(inb[None, :], idx, bins[None, :])
            hr = tl.where(inb[None, :], tl.gather(h, idx, axis=1), 0)
            hf = hr.to(tl.float32)
            tcol = tl.arange(0, 16)
            best = tl.full([BLOCK], float("inf"), tl.float32)
            choice = tl.zeros([BLOCK], tl.int32)
            # 16 tables at a time keeps the cost tile small. Integers below 2**24 throughout (counts
            # <= 256, costs <= 8192, sums <= 2**21): fp32 with IEEE products (no TF32) is exact, so
            # ties resolve like the CPU's, to the lowest index (argmin's left tie-break, strict <).
            for t0 in range(0, NT, 16):
                cmat = tl.load(cost_ptr + cost_off + (t0 + tcol)[None, :] * alpha + bins[:, None],
                               mask=inb[:, None], other=0)
                tot = tl.dot(hf, cmat.to(tl.float32), input_precision="ieee")
                cmin = tl.min(tot, axis=1)
                carg = tl.argmin(tot, axis=1, tie_break_left=True).to(tl.int32) + t0
                better = cmin < best
                best = tl.where(better, cmin, best)
                choice = tl.where(better, carg, choice)
        else:
            # Fallback without tl.gather / tl.dot: rotate the cost table per lane instead (gathers).
            idx = bins[None, :] - m[:, None]
            idx = tl.where(idx < 0, idx + alpha, idx)
            best = tl.full([BLOCK], 2147483647, tl.int32)
            choice = tl.zeros([BLOCK], tl.int32)
            for t in range(NT):
                c = tl.load(cost_ptr + cost_off + t * alpha + idx, mask=valid[:, None] & inb[None, :], other=0)
                total = tl.sum(h * c, axis=1)
                better = total < best
                best = tl.where(better, total, best)
                choice = tl.where(better, t, choice)
        tl.store(center_ptr + k, m.to(tl.uint8), mask=valid)
        tl.store(table_ptr + k, choice.to(tl.uint8), mask=valid)


# ---- host side ------------------------------------------------------------------------------------

def pack_encode_table(freq: np.ndarray, cum: np.ndarray) -> np.ndarray:
    """int32 [NT * A]: f | c << 13 per (table, symbol)."""
    a = freq.shape[1]
    return (freq.astype(np.int64) | (cum[:, :a].astype(np.int64) << 13)).astype(np.int32).ravel()


def pack_decode_table(freq: np.ndarray, cum: np.ndarray, slot_to_symbol: np.ndarray) -> np.ndarray:
    """int32 [NT * 4096] holding uint32 bits: sym | (f - 1) << 8 | (slot - c) << 20 per (table, slot)."""
    sym = slot_to_symbol.astype(np.int64)
    f = np.take_along_axis(freq.astype(np.int64), sym, axis=1)
    bias = np.arange(sym.shape[1], dtype=np.int64)[None, :] - np.take_along_axis(cum.astype(np.int64), sym, axis=1)
    return (sym | ((f - 1) << 8) | (bias << 20)).astype(np.uint32).view(np.int32).ravel()


# Cleared if this Triton cannot compile the tl.gather/tl.dot variant of the stats kernel; set
# KVMESH_TRITON_STATS_DOT=0 to use the gather-loop variant from the start.
_DOT_OK = os.environ.get("KVMESH_TRITON_STATS_DOT", "1") != "0"


def _block(n_lanes: int, cap: int) -> int:
    """Lanes per program: large blocks keep the interpreter's per-op cost down; capped for registers."""
    return max(16, min(cap, triton.next_power_of_2(max(n_lanes, 1))))


class Lanes:
    """Where each lane's symbols live: lane_base int64, lane_stream int32, sym_step, on one device.

    For the coders a lane is a coded stream of ``group`` adjacent channels (symbol u of a token at
    lane_base + token * sym_step + u): lane_stream indexes the coded streams' counts, lane_model the
    model stream (center, table, alphabet, length) of its first channel, the others following at
    model_step. The statistics kernels take lanes of one channel each (lane_stream = model stream)."""

    def __init__(self, lane_base: torch.Tensor, lane_stream: torch.Tensor, sym_step: int,
                 lane_model: torch.Tensor | None = None, group: int = 1, model_step: int = 0) -> None:
        self.lane_base = lane_base.to(torch.int64).contiguous()
        self.lane_stream = lane_stream.to(torch.int32).contiguous()
        self.sym_step = int(sym_step)
        self.lane_model = self.lane_stream if lane_model is None else lane_model.to(torch.int32).contiguous()
        self.group = int(group)
        self.model_step = int(model_step)

    @property
    def n(self) -> int:
        return int(self.lane_base.numel())


def rans_encode(sym: torch.Tensor, lanes: Lanes, lengths: torch.Tensor, center: torch.Tensor, alpha: torch.Tensor,
                tab_off: torch.Tensor, enc_tab: torch.Tensor, nmax: int, interpret: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes every coded stream (one per lane); lengths, center, alpha and tab_off are per model
    stream. Returns (words uint16 [total], counts int32 [lanes]) on sym's device."""
    scratch, counts, width = rans_encode_scratch(sym, lanes, lengths, center, alpha, tab_off, enc_tab, nmax, interpret)
    return compact(scratch, counts, width, interpret), counts


def rans_encode_scratch(sym: torch.Tensor, lanes: Lanes, lengths: torch.Tensor, center: torch.Tensor,
                        alpha: torch.Tensor, tab_off: torch.Tensor, enc_tab: torch.Tensor, nmax: int,
                        interpret: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """rans_encode before compaction (nothing synchronises): (scratch uint16 [lanes * (width + 2)],
    each lane's words at the end of its row, counts int32 [lanes], width = nmax * group)."""
    s_count = lanes.n
    dev = sym.device
    width = nmax * lanes.group
    scratch = torch.empty(s_count * (width + 2), dtype=torch.uint16, device=dev)
    counts = torch.zeros(s_count, dtype=torch.int32, device=dev)
    if s_count:
        block = _block(lanes.n, 4096 if interpret else 128)
        grid = (triton.cdiv(lanes.n, block),)
        _rans_encode_kernel[grid](sym, lanes.lane_base, lanes.lane_stream, lanes.lane_model, lengths, center, alpha,
                                  tab_off, enc_tab, scratch, counts, lanes.n, lanes.sym_step, lanes.model_step,
                                  NMAX=nmax, G=lanes.group, BLOCK=block)
    return scratch, counts, width


def compact(scratch: torch.Tensor, counts: torch.Tensor, nmax: int, interpret: bool = False) -> torch.Tensor:
    s_count = counts.numel()
    if s_count == 0:
        return torch.empty(0, dtype=torch.uint16, device=scratch.device)
    ends = torch.cumsum(counts.to(torch.int64), 0)
    offsets = ends - counts
    total = int(ends[-1])
    out = torch.empty(total, dtype=torch.uint16, device=scratch.device)
    wblock = triton.next_power_of_2(nmax + 2)
    rows = max(1, min(64 if interpret else 4, 8192 // wblock * (16 if interpret else 1)))
    _compact_kernel[(triton.cdiv(s_count, rows),)](scratch, counts, offsets, out, s_count,
                                                  NMAX=nmax, ROWS=rows, WBLOCK=wblock)
    return out


def rans_decode(words: torch.Tensor, counts: torch.Tensor, out: torch.Tensor, lanes: Lanes, lengths: torch.Tensor,
                center: torch.Tensor, alpha: torch.Tensor, dtab_off: torch.Tensor, dec_tab: torch.Tensor, nmax: int,
                interpret: bool = False) -> torch.Tensor:
    """Decodes into out (uint8, lane addressing as in encode); returns status int8 [coded streams]
    (1 = stream valid)."""
    s_count = lanes.n
    status = torch.zeros(s_count, dtype=torch.int8, device=out.device)
    if s_count:
        offsets = torch.cumsum(counts.to(torch.int64), 0) - counts.to(torch.int64)
        block = _block(lanes.n, 4096 if interpret else 128)
        grid = (triton.cdiv(lanes.n, block),)
        _rans_decode_kernel[grid](words, offsets, counts, out, lanes.lane_base, lanes.lane_stream, lanes.lane_model,
                                  lengths, center, alpha, dtab_off, dec_tab, status, lanes.n, lanes.sym_step,
                                  lanes.model_step, NMAX=nmax, G=lanes.group, BLOCK=block)
    return status


def stream_stats(sym: torch.Tensor | None, lanes: Lanes, lengths: torch.Tensor, alpha: int,
                 cost_off: int, cost_tab: torch.Tensor, n_tables: int, nmax: int, bpad: int,
                 hist: torch.Tensor | None = None, write_hist: bool = False, choose: bool = True,
                 interpret: bool = False, center_out: torch.Tensor | None = None,
                 table_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram (into hist [S, 256] when write_hist) and/or (centre, table) uint8 [S] per stream.

    With sym None the histogram is read from hist instead of counted. Only the given lanes' streams are
    written, so one (centre, table) pair of outputs can be filled by several launches (one per alphabet
    size, each with the smallest BPAD >= its alphabet).
    """
    s_count = lengths.numel()
    dev = lengths.device
    center = torch.zeros(s_count, dtype=torch.uint8, device=dev) if center_out is None else center_out
    table = torch.zeros(s_count, dtype=torch.uint8, device=dev) if table_out is None else table_out
    if lanes.n:
        bpad = max(32, bpad)
        block = _block(lanes.n, 2048 if interpret else max(16, 4096 // bpad))
        grid = (triton.cdiv(lanes.n, block),)
        extra = {} if interpret else {"num_warps": 4}
        dummy = center if center_out is None else center_out
        args = (sym if sym is not None else dummy, lanes.lane_base, lanes.lane_stream, lengths, int(alpha),
                int(cost_off), cost_tab, hist if hist is not None else dummy, center, table, lanes.n, lanes.sym_step,
                dummy, dummy, dummy)
        consts = dict(NMAX=nmax, BLOCK=block, BPAD=bpad, NT=n_tables, FROM_HIST=sym is None,
                      WRITE_HIST=write_hist, CHOOSE=choose, **extra)
        global _DOT_OK
        use_dot = _DOT_OK and n_tables % 16 == 0 and choose
        if use_dot:
            try:
                _stats_kernel[grid](*args, DOT=True, **consts)
            except Exception as e:  # noqa: BLE001 - a Triton build that cannot compile tl.gather/tl.dot here
                logger.warning("stats kernel with tl.gather/tl.dot failed (%s); using the gather-loop variant", e)
                _DOT_OK = use_dot = False
        if not use_dot:
            _stats_kernel[grid](*args, DOT=False, **consts)
    return center, table


@triton.jit
def _compact_bytes_kernel(scratch_ptr, count_ptr, offset_ptr, out_ptr, dst_ptr, n_streams,
                          NMAX: tl.constexpr, ROWS: tl.constexpr, WBLOCK: tl.constexpr):
    """_compact_kernel writing little-endian bytes at a byte position read from the device (dst_ptr):
    the words section may start at any byte of a container."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < n_streams
    cnt = tl.load(count_ptr + rows, mask=valid, other=0)
    off = tl.load(offset_ptr + rows, mask=valid, other=0)
    dst = tl.load(dst_ptr)
    w = tl.arange(0, WBLOCK)
    m = valid[:, None] & (w[None, :] < cnt[:, None])
    src = rows.to(tl.int64)[:, None] * (NMAX + 2) + (NMAX + 2 - cnt)[:, None] + w[None, :]
    vals = tl.load(scratch_ptr + src, mask=m, other=0).to(tl.int32)
    at = dst + 2 * (off[:, None] + w[None, :])
    tl.store(out_ptr + at, (vals & 255).to(tl.uint8), mask=m)
    tl.store(out_ptr + at + 1, ((vals >> 8) & 255).to(tl.uint8), mask=m)


def compact_into(scratch: torch.Tensor, counts: torch.Tensor, nmax: int, out: torch.Tensor, dst: torch.Tensor,
                 interpret: bool = False) -> torch.Tensor:
    """Writes the coded streams' words (rans_encode_scratch's rows) as uint16 little-endian bytes into
    out (uint8) from byte dst (int64 [1] on the device) on, in stream order, without synchronising.
    Returns the byte length (int64 [1] on the device)."""
    s_count = counts.numel()
    c64 = counts.to(torch.int64)
    if s_count == 0:
        return torch.zeros(1, dtype=torch.int64, device=out.device)
    ends = torch.cumsum(c64, 0)
    offsets = ends - c64
    wblock = triton.next_power_of_2(nmax + 2)
    rows = max(1, min(64 if interpret else 4, 8192 // wblock * (16 if interpret else 1)))
    _compact_bytes_kernel[(triton.cdiv(s_count, rows),)](scratch, counts, offsets, out, dst, s_count,
                                                        NMAX=nmax, ROWS=rows, WBLOCK=wblock)
    return 2 * ends[-1:]


def stream_stats_lanes(sym: torch.Tensor, lanes: Lanes, lengths: torch.Tensor, alpha: torch.Tensor,
                       cost_off: torch.Tensor, cost_tab: torch.Tensor, n_tables: int, nmax: int, bpad: int,
                       interpret: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centre uint8, table uint8, least cost int32) per stream in ONE launch for streams of any
    alphabets: alpha and cost_off int32 [S] on the device (each stream's alphabet and the start of its
    [NT, alpha] cost tables), bpad >= every alphabet. The values stream_stats gives per alphabet group."""
    s_count = lengths.numel()
    dev = lengths.device
    center = torch.zeros(s_count, dtype=torch.uint8, device=dev)
    table = torch.zeros(s_count, dtype=torch.uint8, device=dev)
    best = torch.zeros(s_count, dtype=torch.int32, device=dev)
    if lanes.n:
        bpad = max(32, bpad)
        block = _block(lanes.n, 2048 if interpret else max(16, 4096 // bpad))
        extra = {} if interpret else {"num_warps": 4}
        _stats_kernel[(triton.cdiv(lanes.n, block),)](
            sym, lanes.lane_base, lanes.lane_stream, lengths, 0, 0, cost_tab, center, center, table, lanes.n,
            lanes.sym_step, alpha, cost_off, best, NMAX=nmax, BLOCK=block, BPAD=bpad, NT=n_tables,
            FROM_HIST=False, WRITE_HIST=False, CHOOSE=True, DOT=False, LANE_ALPHA=True, **extra)
    return center, table, best
