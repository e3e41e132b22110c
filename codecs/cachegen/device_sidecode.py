"""Sections 1-4's coded form (sidecode.py, FORMAT.md §2) written and read on the device.

encode: the four sections' raw bytes (device tensors) become their stored form in a device buffer with
no host synchronisation: every plane is histogrammed, its table normalised and both its candidates
(its bytes, its byte deltas) rANS-coded by triton_rans's kernel in blocks, all planes at once; the
smallest form of each plane and section is picked by device arithmetic and the pieces scattered to
offsets known only on the device. The result is csrc/sidecode.c's bytes, bit for bit.

decode: the host reads the small plane headers from its own copy of the blob (sidecode.parse: every
check but the blocks' end states, in the C path's order: a few hundred bytes a plane, no pass over the
words), and the block tables and counts travel to the device in the blob's own copy (joined after it
in one host buffer: one transfer); the blocks decode there and their end-state checks become flags,
one per section.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from kvmesh.codecs.cachegen import triton_rans as tr
from kvmesh.codecs.cachegen.sidecode import PLANES, SIDE_BLOCK, SPLIT, TABLE_BYTES, Plane

_M = 4096


@dataclass(frozen=True)
class _Shape:
    """The constants of one set of section sizes on one device (cached): planes, candidates (each plane's
    bytes, then each plane's deltas) and their rANS blocks (the coder's lanes)."""
    n: tuple[int, ...]  # raw bytes of sections 1-4
    plane_m: list[int]  # symbols per plane, planes in section order
    plane_sec: list[int]
    nmax: int  # the coder's loop bound
    cand_nb_max: int
    t: dict[str, torch.Tensor]


@functools.lru_cache(maxsize=32)
def _shape(n: tuple[int, ...], device: str) -> _Shape:
    plane_m, plane_sec = [], []
    for i, size in enumerate(n):
        if size:
            plane_m += [size // PLANES[i + 1]] * PLANES[i + 1]
            plane_sec += [i] * PLANES[i + 1]
    NP = len(plane_m)
    N = sum(n)
    ystart = np.concatenate([[0], np.cumsum(plane_m)[:-1]]).astype(np.int64) if NP else np.zeros(0, np.int64)
    cand_m = np.array(plane_m * 2, np.int64)
    cand_start = np.concatenate([ystart, ystart + N]).astype(np.int64)
    cand_nb = -(-cand_m // SIDE_BLOCK)
    lane_cand = np.repeat(np.arange(2 * NP), cand_nb)
    first = np.concatenate([[0], np.cumsum(cand_nb)[:-1]]).astype(np.int64) if NP else np.zeros(0, np.int64)
    lane_pos = np.arange(lane_cand.size) - first[lane_cand]
    lane_len = np.minimum(SIDE_BLOCK, cand_m[lane_cand] - lane_pos * SIDE_BLOCK)
    starts = np.zeros(N, bool)
    starts[ystart] = True
    sec_first = np.zeros(NP, np.int64)
    for p in range(NP):
        sec_first[p] = plane_sec.index(plane_sec[p])
    byte_cand = np.repeat(np.arange(2 * NP), cand_m)
    nl = lane_cand.size
    arrays = dict(
        byte_cand=byte_cand.astype(np.int64), starts=starts, cand_m=cand_m, cand_nb=cand_nb.astype(np.int64),
        lane_base=cand_start[lane_cand] + lane_pos * SIDE_BLOCK, lane_stream=np.arange(nl, dtype=np.int32),
        lane_len=lane_len.astype(np.int32), lane_cand=lane_cand.astype(np.int64), lane_pos=lane_pos.astype(np.int64),
        lane_first=first[lane_cand].astype(np.int64), tab_off=(lane_cand * 256).astype(np.int32),
        center=np.zeros(nl, np.uint8), alpha=np.full(nl, 256, np.int32), plane_m=np.array(plane_m, np.int64),
        plane_sec=np.array(plane_sec, np.int64), sec_first=sec_first, sec_n=np.array(n, np.int64),
        cand_plane=np.concatenate([np.arange(NP), np.arange(NP)]).astype(np.int64),
        cand_kind=np.repeat([1, 2], NP).astype(np.int64))
    t = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    longest = int(lane_len.max()) if nl else 1
    nmax = longest if torch.device(device).type == "cpu" else SIDE_BLOCK
    return _Shape(n, plane_m, plane_sec, nmax, int(cand_nb.max()) if NP else 1, t)


def _split(raw: torch.Tensor) -> torch.Tensor:
    return torch.cat([raw[0::2], raw[1::2]])


def _pack_rows(values: torch.Tensor, width: torch.Tensor | int, valid: torch.Tensor, nbytes: int) -> torch.Tensor:
    """uint8 [R, nbytes]: row r's valid values (in column order, value j at bit j·width) packed LSB
    first; widths up to 16 bits, bits past a row's last value zero."""
    R, n = values.shape
    k = torch.arange(16, device=values.device)
    w = width if isinstance(width, torch.Tensor) else torch.full((R,), width, device=values.device)
    w = w.to(torch.int64)
    col = torch.cumsum(valid.to(torch.int64), 1) - 1  # the value's index among the row's valid ones
    pos = col[:, :, None] * w[:, None, None] + k[None, None, :]
    dump = nbytes * 8
    pos = torch.where(valid[:, :, None] & (k[None, None, :] < w[:, None, None]), pos, dump)
    bits = ((values.to(torch.int64)[:, :, None] >> k) & 1).to(torch.uint8)
    flat = torch.zeros(R, dump + 1, dtype=torch.uint8, device=values.device)
    flat.scatter_(1, pos.reshape(R, -1), bits.reshape(R, -1))
    weights = (1 << torch.arange(8, device=values.device, dtype=torch.int32))
    return (flat[:, :dump].reshape(R, nbytes, 8).to(torch.int32) * weights).sum(dim=2).to(torch.uint8)


@triton.jit
def _put_kernel(buf_ptr, src_ptr, len_ptr, dest_ptr, keep_ptr, W, src_stride, len_stride, dest_stride,
                keep_stride, BLOCK: tl.constexpr):
    """Row r of src (uint8, unit column stride) -> buf[dest[r]:] for its first len[r] bytes, if keep[r]."""
    r = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], tl.int32)  # the row's scalars read as blocks: one mask type throughout
    n = tl.load(len_ptr + r * len_stride + zero)
    d = tl.load(dest_ptr + r * dest_stride + zero)
    m = (tl.load(keep_ptr + r * keep_stride + zero) != 0) & (j < n) & (j < W)
    v = tl.load(src_ptr + r.to(tl.int64) * src_stride + j, mask=m, other=0)
    tl.store(buf_ptr + d + j, v, mask=m)


def _put(buf: torch.Tensor, src: torch.Tensor, length: torch.Tensor, dest: torch.Tensor, keep: torch.Tensor,
         interpret: bool) -> None:
    """Writes src[r, :length[r]] at buf[dest[r]:] for the rows kept, in ONE launch (masked stores: the
    rows not kept write nothing). length, dest: int64 [R] (any stride, 0 included); keep: bool [R]."""
    R, w = src.shape
    if R == 0 or w == 0:
        return
    if src.stride(1) != 1:
        src = src.contiguous()
    block = min(triton.next_power_of_2(w), 1 << 16 if interpret else 1024)
    _put_kernel[(R, triton.cdiv(w, block))](buf, src, length, dest, keep.view(torch.uint8), w, src.stride(0),
                                            length.stride(0), dest.stride(0), keep.stride(0), BLOCK=block)


@triton.jit
def _place_words_kernel(scratch_ptr, count_ptr, dst_ptr, out_ptr, n_lanes,
                        NMAX: tl.constexpr, ROWS: tl.constexpr, WBLOCK: tl.constexpr):
    """Each lane's words (the end of its scratch row) as little-endian bytes at its own byte dst;
    a lane with count 0 writes nothing."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < n_lanes
    cnt = tl.load(count_ptr + rows, mask=valid, other=0)
    dst = tl.load(dst_ptr + rows, mask=valid, other=0)
    w = tl.arange(0, WBLOCK)
    m = valid[:, None] & (w[None, :] < cnt[:, None])
    src = rows.to(tl.int64)[:, None] * (NMAX + 2) + (NMAX + 2 - cnt)[:, None] + w[None, :]
    vals = tl.load(scratch_ptr + src, mask=m, other=0).to(tl.int32)
    at = dst[:, None] + 2 * w[None, :]
    tl.store(out_ptr + at, (vals & 255).to(tl.uint8), mask=m)
    tl.store(out_ptr + at + 1, ((vals >> 8) & 255).to(tl.uint8), mask=m)


def _tables(hist: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """FORMAT.md's normalisation, per row of hist [K, 256]: freq int64 [K, 256] summing to 4096."""
    present = hist > 0
    nz = present.sum(dim=1)
    freq = torch.where(present, 1 + hist * (_M - nz)[:, None] // m[:, None], torch.zeros_like(hist))
    top = torch.argmax(hist, dim=1)  # the first of the largest counts
    return freq.scatter_add(1, top[:, None], (_M - freq.sum(dim=1))[:, None])


def encode_into(raws: list[torch.Tensor], buf: torch.Tensor, interpret: bool) -> torch.Tensor:
    """Writes sections 1-4 (raws: their raw bytes, uint8 on the device) in their stored form one after
    another from buf[0] on; returns their lengths (int64 [4] on the device). Every write is a masked
    store: nothing lands past the sections' own bytes."""
    dev = buf.device
    sh = _shape(tuple(int(r.numel()) for r in raws), str(dev))
    t = sh.t
    NP = len(sh.plane_m)
    if NP == 0:
        return torch.zeros(4, dtype=torch.int64, device=dev)
    Y = torch.cat([_split(r) if SPLIT[i + 1] else r for i, r in enumerate(raws) if r.numel()])
    prev = torch.roll(Y, 1)
    D = torch.where(t["starts"], Y, ((Y.to(torch.int16) - prev.to(torch.int16)) & 255).to(torch.uint8))
    Z = torch.cat([Y, D])
    K = 2 * NP
    hist = torch.zeros(K * 256, dtype=torch.int64, device=dev)
    hist.scatter_add_(0, t["byte_cand"] * 256 + Z.to(torch.int64), torch.ones_like(t["byte_cand"]))
    hist = hist.view(K, 256)
    freq = _tables(hist, t["cand_m"])
    cum = torch.cumsum(freq, dim=1) - freq
    enc_tab = (freq | (cum << 13)).to(torch.int32).reshape(-1)
    lanes = tr.Lanes(t["lane_base"], t["lane_stream"], 1)
    scratch, counts, _ = tr.rans_encode_scratch(Z, lanes, t["lane_len"], t["center"], t["alpha"], t["tab_off"],
                                                enc_tab, sh.nmax, interpret)
    cnt = counts.to(torch.int64)
    lc = t["lane_cand"]
    W = torch.zeros(K, dtype=torch.int64, device=dev).index_add_(0, lc, cnt)
    cmin = torch.full((K,), 1 << 20, dtype=torch.int64, device=dev).scatter_reduce_(0, lc, cnt, "amin")
    cmax = torch.zeros(K, dtype=torch.int64, device=dev).scatter_reduce_(0, lc, cnt, "amax")
    width = ((cmax - cmin)[:, None] >> torch.arange(16, device=dev)[None, :] > 0).sum(dim=1)
    nz = (hist > 0).sum(dim=1)
    ftab = (12 * nz + 7) // 8
    ncnt = (t["cand_nb"] * width + 7) // 8
    hlen = TABLE_BYTES + ftab + 7 + ncnt
    csize = hlen + 2 * W
    options = torch.stack([t["plane_m"], csize[:NP], csize[NP:]], dim=1)
    mode = torch.argmin(options, dim=1)  # the first of the smallest: ties go to the lower mode
    plane_len = 1 + options.gather(1, mode[:, None])[:, 0]
    ps = t["plane_sec"]
    coded_len = torch.zeros(4, dtype=torch.int64, device=dev).index_add_(0, ps, plane_len)
    coded = coded_len < t["sec_n"]  # the coded form only when shorter
    sec_len = torch.where(coded, coded_len, t["sec_n"])
    sec_off = torch.cumsum(sec_len, 0) - sec_len
    cs = torch.cumsum(plane_len, 0) - plane_len
    plane_off = sec_off[ps] + cs - cs[t["sec_first"]]
    plane_coded = coded[ps]
    one = torch.ones(1, dtype=torch.int64, device=dev)
    # raw sections, then each plane's mode byte and, for a raw plane, its bytes
    for i, r in enumerate(raws):
        if r.numel():
            _put(buf, r[None, :], torch.full((1,), r.numel(), dtype=torch.int64, device=dev), sec_off[i:i + 1],
                 ~coded[i:i + 1], interpret)
    _put(buf, mode.to(torch.uint8)[:, None], one.expand(NP), plane_off, plane_coded, interpret)
    at = first = 0
    for i in range(4):
        if not sh.n[i]:
            continue
        P, m = PLANES[i + 1], sh.n[i] // PLANES[i + 1]
        pl = slice(first, first + P)
        _put(buf, Y[at:at + sh.n[i]].view(P, m), t["plane_m"][pl], plane_off[pl] + 1,
             plane_coded[pl] & (mode[pl] == 0), interpret)
        at += sh.n[i]
        first += P
    # each chosen candidate's header: bitmap, 12-bit frequencies, words, counts (base, width, bits)
    cp = t["cand_plane"]
    chosen = plane_coded[cp] & (mode[cp] == t["cand_kind"])
    hdr = plane_off[cp] + 1
    weights = 1 << torch.arange(8, device=dev, dtype=torch.int32)
    bitmap = ((hist > 0).view(K, TABLE_BYTES, 8).to(torch.int32) * weights).sum(dim=2).to(torch.uint8)
    _put(buf, bitmap, torch.full((K,), TABLE_BYTES, dtype=torch.int64, device=dev), hdr, chosen, interpret)
    _put(buf, _pack_rows(freq - 1, 12, hist > 0, 384), ftab, hdr + TABLE_BYTES, chosen, interpret)
    head = torch.stack([W & 255, (W >> 8) & 255, (W >> 16) & 255, (W >> 24) & 255,
                        cmin & 255, (cmin >> 8) & 255, width], dim=1).to(torch.uint8)
    _put(buf, head, torch.full((K,), 7, dtype=torch.int64, device=dev), hdr + TABLE_BYTES + ftab, chosen,
         interpret)
    vals = torch.zeros(K, sh.cand_nb_max, dtype=torch.int64, device=dev)
    vals[lc, t["lane_pos"]] = cnt - cmin[lc]
    in_row = torch.arange(sh.cand_nb_max, device=dev)[None, :] < t["cand_nb"][:, None]
    _put(buf, _pack_rows(vals, width, in_row, 2 * sh.cand_nb_max), ncnt, hdr + TABLE_BYTES + ftab + 7, chosen,
         interpret)
    # the words of each chosen candidate's blocks, in block order
    lcs = torch.cumsum(cnt, 0) - cnt
    dst = hdr[lc] + hlen[lc] + 2 * (lcs - lcs[t["lane_first"]])
    keep = chosen[lc]
    wblock = triton.next_power_of_2(sh.nmax + 2)
    rows = max(1, min(64 if interpret else 4, 8192 // wblock * (16 if interpret else 1)))
    nl = cnt.numel()
    _place_words_kernel[(triton.cdiv(nl, rows),)](scratch, torch.where(keep, counts, torch.zeros_like(counts)),
                                                  torch.where(keep, dst, torch.zeros_like(dst)), buf, nl,
                                                  NMAX=sh.nmax, ROWS=rows, WBLOCK=wblock)
    return sec_len


# ---- decode ---------------------------------------------------------------------------------------

@dataclass
class DecodePlan:
    """What the host read from sections 1-4 for the device: per section, None (raw), [] (empty) or its
    planes; the block arrays (`extra`, copied to the device with the blob, in the same transfer, 8-byte
    aligned) and their counts."""
    offsets: list[int]  # each section's byte offset in the blob
    sizes: list[int]  # raw bytes of each section
    planes: list[list[Plane] | None]
    extra: bytes  # int32 counts [NL], int32 lengths [NL], int64 out positions [NL], int32 table [NL],
    # int32 section [NL], int16 freq [coded planes, 256]
    n_lanes: int
    n_tables: int


def decode_plan(offsets: list[int], sizes: list[int], planes: list[list[Plane] | None]) -> DecodePlan:
    counts, lengths, outpos, table, section, freqs = [], [], [], [], [], []
    at = 0
    for i, pls in enumerate(planes):
        if pls:
            m = sizes[i] // PLANES[i + 1]
            for p, pl in enumerate(pls):
                if pl.counts is not None:
                    nb = pl.counts.size
                    counts.append(pl.counts)
                    lengths.append(np.minimum(SIDE_BLOCK, m - np.arange(nb) * SIDE_BLOCK))
                    outpos.append(at + p * m + np.arange(nb) * SIDE_BLOCK)
                    table.append(np.full(nb, len(freqs)))
                    section.append(np.full(nb, i))
                    freqs.append(pl.freq)
        at += sizes[i]
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    nl = sum(c.size for c in counts)
    extra = b"".join([cat(counts, "<i4").tobytes(), cat(lengths, "<i4").tobytes(), cat(outpos, "<i8").tobytes(),
                      cat(table, "<i4").tobytes(), cat(section, "<i4").tobytes(), cat(freqs, "<i2").tobytes()])
    return DecodePlan(offsets, sizes, planes, extra, nl, len(freqs))


def decode(b: torch.Tensor, extra: torch.Tensor, plan: DecodePlan, interpret: bool
           ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(sections 1-4's raw bytes as device uint8 tensors, bad int64 [4]: 1 where a block of that
    section failed its end-state check). b: the blob on the device; extra: plan.extra on the device
    (8-byte aligned; a view of the same copy as b)."""
    dev = b.device
    nl, nt = plan.n_lanes, plan.n_tables
    at = 0

    def take(n: int, dt: torch.dtype, size: int) -> torch.Tensor:
        nonlocal at
        v = extra[at:at + n * size].view(dt)
        at += n * size
        return v

    counts, lengths = take(nl, torch.int32, 4), take(nl, torch.int32, 4)
    outpos = take(nl, torch.int64, 8)  # 8-byte aligned: extra is, and 8·nl bytes come before
    table, section = take(nl, torch.int32, 4), take(nl, torch.int32, 4)
    freq = take(nt * 256, torch.int16, 2).to(torch.int64).view(nt, 256) if nt else None
    total = sum(plan.sizes)
    Y = torch.zeros(total, dtype=torch.uint8, device=dev)
    bad = torch.zeros(4, dtype=torch.int64, device=dev)
    if nl:
        cum = torch.cumsum(freq, dim=1)
        slots = torch.arange(_M, device=dev).expand(nt, _M).contiguous()
        sym = torch.searchsorted(cum, slots, right=True)
        f = freq.gather(1, sym)
        bias = slots - (cum - freq).gather(1, sym)
        entry = sym | ((f - 1) << 8) | (bias << 20)
        dec_tab = torch.where(entry >= 1 << 31, entry - (1 << 32), entry).to(torch.int32).reshape(-1)
        words = torch.cat([b[plan.offsets[i] + pl.at: plan.offsets[i] + pl.at + 2 * int(pl.counts.sum())]
                           for i, pls in enumerate(plan.planes) if pls for pl in pls if pl.counts is not None])
        words = words.view(torch.uint16)
        lanes = tr.Lanes(outpos, torch.arange(nl, device=dev, dtype=torch.int32), 1)
        longest = SIDE_BLOCK if dev.type != "cpu" else max(1, max(
            min(SIDE_BLOCK, plan.sizes[i] // PLANES[i + 1]) for i, pls in enumerate(plan.planes) if pls))
        status = tr.rans_decode(words, counts, Y, lanes, lengths, torch.zeros(nl, dtype=torch.uint8, device=dev),
                                torch.full((nl,), 256, dtype=torch.int32, device=dev), table * _M, dec_tab, longest,
                                interpret)
        bad.index_add_(0, section.to(torch.int64), (status == 0).to(torch.int64))
    out, at = [], 0
    for i, pls in enumerate(plan.planes):
        n = plan.sizes[i]
        off = plan.offsets[i]
        if pls is None:  # stored raw
            out.append(b[off:off + n])
        elif not pls:
            out.append(b[off:off])
        else:
            m = n // PLANES[i + 1]
            for p, pl in enumerate(pls):
                seg = Y[at + p * m: at + (p + 1) * m]
                if pl.counts is None:
                    seg.copy_(b[off + pl.at: off + pl.at + m])
                elif pl.mode == 2:
                    seg.copy_((torch.cumsum(seg.to(torch.int64), 0) & 255).to(torch.uint8))
            y = Y[at:at + n]
            if SPLIT[i + 1]:
                raw = torch.empty(n, dtype=torch.uint8, device=dev)
                half = (n + 1) // 2
                raw[0::2], raw[1::2] = y[:half], y[half:]
                y = raw
            out.append(y)
        at += n
    return out, bad
