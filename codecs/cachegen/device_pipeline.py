"""The cachegen container made and read on the device (the Triton backend's encode and decode).

encode: the chunk goes in once; quantization, statistics, rANS, sections 1-4 in their coded form
(device_sidecode.py: byte planes rANS-coded against their own tables, the bytes the C path writes),
the stream-length packing (section 5), the words (6), the protected rows (7) and the CRC of all of
them are computed by kernels and torch ops into ONE device buffer, at offsets only the device knows,
with no host synchronisation on the way. The input checks (finite, |x| <= 65504) are device flags. At
the end one small copy brings the sizes, the CRC and the flags (the one synchronisation), and one copy
brings the finished sections; the host adds the 28-byte header, the section table and section 0 (a few
dozen bytes it knows) and joins the CRCs algebraically (device_crc.crc32_combine).

decode: the host reads sections 1-4's block tables and word counts from its own copy of the blob first
(sidecode.parse, the C path's checks), and the blob and those tables go to the device in ONE copy (one
page-locked staging buffer on a GPU, the tables 8-byte aligned after the blob, device views of each);
the blocks, the CRC, the stream-length unpacking and every validation of the streams run there as
flags; one synchronisation at the end reads them and raises the CPU path's CodecError. Containers
written before 2026-12-03 (zlib sections 1-4, variant bit 2 clear) are inflated on the host and travel
in that same copy instead of the tables.

Containers coded with cross-layer prediction (section 8) decode here too: the host reads section 8's
flags from its copy of the blob and plans the loop over layers; on the device each predicted layer is
one kernel (fixed-point: the parts' int16 features made on the fly from scales that never leave the
device) adding its prediction to the dequantized residual, protected rows kept.

Encoding with a layer predictor runs here too, with no more copies: layer by layer on the device (the
prediction, the residual-or-itself choice as a device level count feeding the quantize kernels,
dequantize, protected rows, the features' scales); the streams' alphabets follow those counts on the
device (one statistics launch for streams of every alphabet, encode tables for every count the
writer may choose), and the chosen counts and predicted flags come back with the sizes, CRC and
flags (4L int32 values more) for sections 0 and 8, which the host writes.

Every device<->host copy goes through :func:`to_host` / :func:`to_device`: the seam the tests count.
Chunks with no rest tokens keep codec.py's path.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from kvmesh.codecs import container
from kvmesh.codecs.base import check_kv_structure
from kvmesh.codecs.cachegen import delta, quant
from kvmesh.codecs.cachegen import device_crc as dcrc
from kvmesh.codecs.cachegen import device_sidecode as dsc
from kvmesh.codecs.cachegen import sidecode
from kvmesh.codecs.cachegen import triton_quant as tq
from kvmesh.codecs.cachegen import triton_rans as tr
from kvmesh.codecs.cachegen.layout import channel_group, stream_layout
from kvmesh.codecs.cachegen.predict import FLAG_FIXED, FLAG_FP32, LayerPredictor, features
from kvmesh.codecs.cachegen.tables import TABLE_FAMILY_VERSION
from kvmesh.codecs.errors import CodecError

# ---- the transfer seam --------------------------------------------------------------------------

_trace = threading.local()


@contextlib.contextmanager
def record_transfers() -> Iterator[list[tuple[str, str, str, int]]]:
    """Collects (direction "d2h"/"h2d", what, device type of the device side, bytes) of every copy the
    pipeline makes in this thread while the block runs."""
    log: list[tuple[str, str, str, int]] = []
    old = getattr(_trace, "log", None)
    _trace.log = log
    try:
        yield log
    finally:
        _trace.log = old


def _note(direction: str, what: str, t: torch.Tensor, dev: torch.device) -> None:
    log = getattr(_trace, "log", None)
    if log is not None:
        log.append((direction, what, dev.type, t.numel() * t.element_size()))


class _Staging:
    """One page-locked host buffer per thread and direction (a pageable copy runs at a fraction of the
    bus speed); it grows to the largest copy made, never beyond MAX_STAGING. Per thread: a container
    copied out is read (joined into the bytes returned) after to_host returns; a copy in is complete
    when to_device returns (a blocking copy), so the buffer is free for the next one."""

    MAX_STAGING = 1 << 31

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def host(self, n: int, device: torch.device) -> torch.Tensor:
        """uint8 [n] on the host: a view of the page-locked buffer for a CUDA copy of at most
        MAX_STAGING bytes, else a fresh tensor (on the CPU, the "copy" to the device is this tensor)."""
        if device.type != "cuda" or n > self.MAX_STAGING:
            return torch.empty(n, dtype=torch.uint8)
        if self.buf is None or self.buf.numel() < n:
            self.buf = torch.empty(max(n, 1 << 20), dtype=torch.uint8, pin_memory=True)
        return self.buf[:n]

    def copy(self, t: torch.Tensor) -> np.ndarray:
        if t.device.type != "cuda" or t.numel() > self.MAX_STAGING:
            return t.cpu().numpy()
        host = self.host(t.numel(), t.device)
        host.copy_(t)
        return host.numpy()


_staging = threading.local()


def _stage(direction: str) -> _Staging:
    if not hasattr(_staging, direction):
        setattr(_staging, direction, _Staging())
    return getattr(_staging, direction)


@contextlib.contextmanager
def _sync_allowed(device: torch.device) -> Iterator[None]:
    """Lifts torch.cuda.set_sync_debug_mode for the seam's own copies: bench/gpu_check.py runs the
    pipeline with the mode at "error", so any other synchronisation on the way raises there."""
    mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def to_host(t: torch.Tensor, what: str) -> np.ndarray:
    """The pipeline's only device-to-host copies (each one synchronises with the device's queue)."""
    _note("d2h", what, t, t.device)
    with _sync_allowed(t.device):
        if what == "container":
            return _stage("d2h").copy(t.contiguous())
        return t.cpu().numpy()


ALIGN = 8  # where each part of a joined copy starts on the device (an int64 view needs no copy)


def to_device(parts: list[np.ndarray | bytes | bytearray | memoryview], device: torch.device, what: str
              ) -> list[torch.Tensor]:
    """The pipeline's only host-to-device copy: the parts (bytes) joined in one host buffer (page-locked
    on a GPU), each starting ALIGN-aligned, in ONE transfer; returns the parts as uint8 views of it on
    the device. One copy, not one per part: each transfer costs a launch and a wait, and a decode's
    small tables would otherwise cost as much as its blob."""
    sizes = [memoryview(p).nbytes for p in parts]
    starts, pos = [], 0
    for n in sizes:
        starts.append(pos)
        pos += n + (-n) % ALIGN
    with _sync_allowed(device):
        host = _stage("h2d").host(pos, device)
        for p, at, n in zip(parts, starts, sizes):
            if n:
                with _quiet_readonly():
                    host[at:at + n].copy_(torch.from_numpy(np.frombuffer(p, np.uint8)))
            host[at + n:at + n + (-n) % ALIGN].zero_()
        _note("h2d", what, host, device)
        d = host.to(device)
    return [d[at:at + n] for at, n in zip(starts, sizes)]


@contextlib.contextmanager
def _quiet_readonly() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        yield


# ---- encode -------------------------------------------------------------------------------------

@triton.jit
def _protect_rows_kernel(x_ptr, mask_ptr, pos_ptr, n_ptr, out_ptr, off_ptr, nmask, n_rows, C,
                         BLOCK_R: tl.constexpr, CPAD: tl.constexpr):
    """Section 7's rows: each masked row r of x [rows, C] (its index p among them in pos) quantized with
    mode 1 at 256 levels, as _protect_encode does; lo16 at byte 2p, hi16 at 2n + 2p and the symbols at
    4n + p·C after the mask, the section starting at off_ptr[0]. Unmasked rows read nothing."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n_rows
    sel = tl.load(mask_ptr + r, mask=rm, other=0) != 0
    c = tl.arange(0, CPAD)
    m = sel[:, None] & (c < C)[None, :]
    x = tl.load(x_ptr + r.to(tl.int64)[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
    lo16 = tq._round_down_fp16(tl.where(sel, tl.min(tl.where(m, x, float("inf")), axis=1), 0.0))
    hi16 = tq._round_up_fp16(tl.where(sel, tl.max(tl.where(m, x, float("-inf")), axis=1), 0.0))
    lo = lo16.to(tl.float32)
    q = tq._quantize(x, lo[:, None], (hi16.to(tl.float32) - lo)[:, None], 256.0)
    p = tl.load(pos_ptr + r, mask=rm, other=0)
    n = tl.load(n_ptr)
    base = tl.load(off_ptr) + nmask
    lob = lo16.to(tl.int16, bitcast=True).to(tl.int32)
    hib = hi16.to(tl.int16, bitcast=True).to(tl.int32)
    tl.store(out_ptr + base + 2 * p, (lob & 255).to(tl.uint8), mask=sel)
    tl.store(out_ptr + base + 2 * p + 1, ((lob >> 8) & 255).to(tl.uint8), mask=sel)
    tl.store(out_ptr + base + 2 * n + 2 * p, (hib & 255).to(tl.uint8), mask=sel)
    tl.store(out_ptr + base + 2 * n + 2 * p + 1, ((hib >> 8) & 255).to(tl.uint8), mask=sel)
    tl.store(out_ptr + base + 4 * n + p[:, None] * C + c[None, :], q, mask=m)


def _flat_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The little-endian bytes of tensors (codec._tensor_bytes) as one uint8 tensor on their device."""
    return torch.cat([t.detach().contiguous().view(torch.uint8).reshape(-1) for t in tensors])


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool/0-1 [n] -> uint8 [ceil(n / 8)], LSB first, padding bits zero (np.packbits little)."""
    n = bits.numel()
    pad = (-n) % 8
    b = bits.to(torch.uint8)
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    w = (1 << torch.arange(8, device=b.device, dtype=torch.int32))
    return (b.reshape(-1, 8).to(torch.int32) * w).sum(dim=1).to(torch.uint8)


def _pack_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codec.pack_uints on the device: (uint8 [3 + 2n]: base, width, the packed values, zero beyond the
    section's end; its length int64 [1]). Widths are at most 16 bits (a count is below 2^16)."""
    dev = counts.device
    n = counts.numel()
    c = counts.to(torch.int64)
    base = c.min()
    v = c - base
    k = torch.arange(16, device=dev, dtype=torch.int64)
    width = ((v.max() >> k) > 0).sum()
    bits = ((v[:, None] >> k[None, :]) & 1).to(torch.uint8)
    pos = torch.arange(n, device=dev, dtype=torch.int64)[:, None] * width + k[None, :]
    dump = 16 * n
    pos = torch.where(k[None, :] < width, pos, dump)  # bits past the width would land in the next value
    flat = torch.zeros(dump + 1, dtype=torch.uint8, device=dev)
    flat.scatter_(0, pos.reshape(-1), bits.reshape(-1))
    packed = _pack_bits(flat[:dump])
    head = torch.stack([base & 255, (base >> 8) & 255, width]).to(torch.uint8)
    return torch.cat([head, packed]), (3 + (n * width + 7) // 8).reshape(1)


def encodable(codec: object, kv: torch.Tensor) -> bool:
    """Whether the device pipeline writes this chunk (else codec.py's path, same bytes)."""
    return isinstance(kv, torch.Tensor) and kv.dim() == 4 and kv.shape[2] > codec.level.lead_tokens


def encode(codec: object, kv: torch.Tensor) -> bytes:
    """CacheGenCodec.encode on the Triton backend for chunks :func:`encodable` accepts: the same bytes."""
    from kvmesh.codecs.cachegen import codec as cg

    kv = check_kv_structure(kv)
    be = codec.backend
    dev = be.device
    _, L, T, C = kv.shape
    if codec.key_profile is not None:
        codec.key_profile.check(L, C)
    predictor = codec.predictor
    if predictor is not None:
        predictor.check(L, C)
    level = codec.level
    levels = level.levels_for(L)
    modes = (level.key_mode, level.value_mode)
    lead = min(level.lead_tokens, T)
    rest = T - lead
    x = kv.detach()
    if x.device != dev:  # a chunk still on the host: the one copy in (through the seam, so it is counted)
        _note("h2d", "input", x, dev)
        with _sync_allowed(dev):
            x = x.to(dev)
    amax = x.abs().amax().to(torch.float32)
    flags = torch.stack([~torch.isfinite(amax), amax > quant.FP16_MAX]).to(torch.int64)

    lead_raw = torch.empty(0, dtype=torch.uint8, device=dev)  # lead 0 (CacheGenCodec.for_chunk): section 1 empty
    if lead:
        lead_q, lead_sides = be.quantize(x[:, :, :lead], np.full((2, L), cg.LEAD_LEVELS), cg.LEAD_MODES)
        lead_raw = _flat_bytes([*lead_sides[0], *lead_sides[1], lead_q])
    xr = x[:, :, lead:].contiguous()
    mask = cg.protected_rows(xr, level.protect, level.tail_for(T)) if level.protects else None
    layout = stream_layout(L, rest, C, levels, channel_group(C))  # with a predictor: lanes and lengths only
    chosen = None
    if predictor is None:
        q, sides = be.quantize(xr, levels, modes, key_profile=codec.key_profile)
        ll = be.layout_lanes(layout)
        center, table, dflags = be.stream_models_device(q, layout, level.delta)
        qs = delta.forward(q, ll.alphabet, dflags) if any(level.delta) else q
        scratch, counts, width = be.rans_encode_scratch(qs, center, table, layout)
    else:  # the level counts chosen per layer stay on the device, so do the streams' alphabets
        q, sides, lv, used = _quantize_predicted(codec, xr, levels, modes, mask)
        alphabets = _possible_alphabets(levels)
        center, table, dflags, alpha, enc_off = be.stream_models_chosen(q, layout, lv, alphabets, level.delta)
        qs = delta.forward(q, lv, dflags) if any(level.delta) else q
        scratch, counts, width = be.rans_encode_chosen(qs, center, alpha, enc_off, layout, alphabets)
        chosen = torch.cat([lv.reshape(-1), used.reshape(-1)]).to(torch.int64)
    meta = torch.cat([center, table | (dflags.to(torch.uint8) << 7)])

    # the device buffer: sections 1-4 in their coded form (sidecode.py), then 5, 6 and 7, at offsets only
    # the device knows
    raws = [lead_raw, _flat_bytes(sides[0]), _flat_bytes(sides[1]), meta]
    nraw = sum(r.numel() for r in raws)
    n_coded = layout.num_coded
    max5 = 3 + 2 * n_coded
    max6 = 2 * int(layout.coded_lengths.sum() + 2 * n_coded)
    nmask = (2 * L * rest + 7) // 8
    max7 = cg.protected_bytes(L, rest, C, 2 * L * rest) if level.protects else 0  # (present, empty, with a predictor)
    bound = nraw + max(max5, 1) + max6 + max7
    buf = torch.empty(bound, dtype=torch.uint8, device=dev)
    len14 = dsc.encode_into(raws, buf, be.interpret)
    z = len14.sum().reshape(1)
    sec5, len5 = _pack_counts(counts)
    buf.index_copy_(0, z + torch.arange(max5, device=dev), sec5[:max5])
    len6 = tr.compact_into(scratch, counts, width, buf, z + len5, be.interpret)
    len7 = torch.zeros(1, dtype=torch.int64, device=dev)
    if level.protects:
        off7 = z + len5 + len6
        mask = mask.reshape(-1)
        n = mask.sum().reshape(1)
        buf.index_copy_(0, off7 + torch.arange(nmask, device=dev), _pack_bits(mask))
        rows = 2 * L * rest
        pos_rows = torch.cumsum(mask.to(torch.int64), 0) - 1
        cpad = triton.next_power_of_2(C)
        block_r = max(1, min(256 if be.interpret else 16, 4096 // cpad))
        _protect_rows_kernel[(triton.cdiv(rows, block_r),)](
            xr, mask.to(torch.uint8), pos_rows, n, buf, off7, nmask, rows, C, BLOCK_R=block_r, CPAD=cpad,
            **tq._opts(be.interpret, 4))
        len7 = nmask + n * (4 + C)
    tail = z + len5 + len6 + len7
    crc = dcrc.raw_crc(buf, 0, tail, bound, be.interpret)
    info = to_host(torch.cat([len14, len5, len6, len7, flags, crc.to(torch.int64)]
                             + ([chosen] if chosen is not None else [])).to(torch.int32), "sizes, crc, flags")
    *lens, nonfinite, too_big, crc_tail = (int(v) for v in info[:10])
    _input_errors(nonfinite, too_big)
    if chosen is not None:  # the counts the device chose (section 0) and its predicted layers (section 8)
        levels = info[10:10 + 2 * L].astype(np.int64).reshape(2, L)
        used = info[10 + 2 * L:].astype(bool).reshape(2, L)
    total = sum(lens)
    host = to_host(buf[:total], "container")
    family = TABLE_FAMILY_VERSION | (channel_group(C).bit_length() - 1) << 4
    variant = (cg.VARIANT_PROTECTED if level.protects or predictor is not None else 0) | cg.VARIANT_CODED \
        | (cg.VARIANT_PREDICTED if predictor is not None else 0)
    params = (cg._PARAMS.pack(modes[0], modes[1], quant.SEGMENT, family, lead)
              + (levels - 1).astype(np.uint8).tobytes() + bytes([variant]))
    sec8 = b""  # section 8 (the host knows it: the predictor's id and the flags read with the levels)
    if predictor is not None:
        flag = FLAG_FIXED if codec.fixed_prediction else FLAG_FP32
        sec8 = predictor.ident + (used * flag).astype(np.uint8).tobytes()
    lengths = [len(params), *lens[:6]] + ([lens[6]] if variant & cg.VARIANT_BITS else []) \
        + ([len(sec8)] if predictor is not None else [])
    head = container.pack_head(codec.codec_id, codec.level_id, kv.dtype, tuple(kv.shape), lengths) + params
    crc_all = dcrc.crc32_combine(zlib.crc32(head), (crc_tail & 0xFFFFFFFF) ^ dcrc.crc32_zeros(total), total)
    return b"".join([head, memoryview(host), sec8, struct.pack("<I", zlib.crc32(sec8, crc_all))])


def _input_errors(nonfinite: int, too_big: int) -> None:
    """codec.py's input errors, from the device's flags."""
    if nonfinite:
        raise CodecError("kv contains inf or NaN values; refusing to encode")
    if too_big:
        raise CodecError("cachegen stores fp16 bounds: values beyond +-65504 cannot be encoded (use 'lossless')")


def _possible_alphabets(levels: np.ndarray) -> tuple[int, ...]:
    """Every level count predict.residual_levels may give a layer of these base counts: the base itself
    (layer 0, or coded as itself), and below it every count of the right parity (an even base - 1 keeps
    a level at zero: odd counts from 3)."""
    out: set[int] = set()
    for base in {int(b) for b in np.asarray(levels).reshape(-1)}:
        out.update([base, *(range(3, base, 2) if (base - 1) % 2 == 0 else range(2, base))])
    return tuple(sorted(out))


def _quantize_predicted(codec: object, x: torch.Tensor, levels: np.ndarray, modes: tuple[int, int],
                        mask: torch.Tensor | None
                        ) -> tuple[torch.Tensor, list[list[torch.Tensor]], torch.Tensor, torch.Tensor]:
    """codec.CacheGenCodec._quantize_predicted on the device: x [2, L, R, C] (the rest tokens), layer by
    layer (K, then V), each coded as its residual from the prediction made of the layers as the decoder
    will have them (protected rows: mask bool [2, L, R] or None) when predict.residual_levels says it
    needs fewer levels (computed on the device: triton_quant.residual_choice). The level counts stay device tensors feeding the quantize kernels, the
    features' scales too (fp32 bit patterns of each decoded layer's largest magnitude). Nothing is read
    back: returns (q, sides, levels int64 [2, L], used bool [2, L]), the last two on the device."""
    from kvmesh.codecs.cachegen import codec as cg

    be = codec.backend
    predictor, fixed, profile = codec.predictor, codec.fixed_prediction, codec.key_profile
    _, L, R, C = x.shape
    dev = x.device
    xf = x.to(torch.float32)
    dec = torch.empty_like(xf)
    q = torch.empty(xf.shape, dtype=torch.uint8, device=dev)
    lv = be._levels_on_device(levels).clone()  # fp32 [2, L]: each chosen count written in on the device
    used = torch.zeros(2, L, dtype=torch.bool, device=dev)
    restored = None
    if mask is not None:  # mode 1 at 256 levels is per row: every row's value as section 7 restores it
        rq, rsides = be.quantize(xf, np.full((2, L), cg.LEAD_LEVELS), cg.LEAD_MODES)
        restored = be.dequantize(rq, rsides, np.full((2, L), cg.LEAD_LEVELS), cg.LEAD_MODES)
    top = torch.zeros(2 * L, dtype=torch.int32, device=dev)  # [layer, K/V]
    parts: tuple[list, list] = ([], [])
    for layer in range(L):
        for kv in (0, 1):
            target, lvl, pred = xf[kv, layer], lv[kv, layer:layer + 1], None
            if layer:
                if fixed:
                    w, sw, b = be.fixed_weights(predictor, kv, layer)
                    src = [(0, layer - 1), (1, layer - 1), (0, layer)][:2 + kv]
                    pred = torch.empty(R, C, dtype=torch.float32, device=dev)
                    tq.predict_layer(dec.view(2 * L, R, C), w, sw, b, [k * L + j for k, j in src],
                                     [2 * j + k for k, j in src], 0, 0, top, None, be.interpret, out=pred)
                else:
                    pred = be.predict(features(dec, kv, layer), predictor, kv, layer)
                resid = torch.empty_like(target)
                use = used[kv, layer:layer + 1]
                tq.residual_choice(target, pred, int(levels[kv, layer]), modes[kv], resid, lvl, use, be.interpret)
                target = torch.where(use, resid, target)
            ql, side = tq.quantize(target[None], lvl, modes[kv], be.interpret, q=q[kv, layer:layer + 1])
            if kv == 0 and profile is not None:
                tq.round_keys(target[None], side, lvl, modes[kv], profile.layer(layer), be.interpret, q=ql)
            y = tq.dequantize(ql, side, lvl, modes[kv], torch.float32, be.interpret, out=dec[kv, layer:layer + 1])[0]
            feeds = fixed and (kv == 0 or layer < L - 1)  # the last values feed nothing
            tq.finish_layer(y, pred, used[kv, layer:layer + 1] if pred is not None else None,
                            mask[kv, layer] if mask is not None else None,
                            restored[kv, layer] if restored is not None else None,
                            top[2 * layer + kv:2 * layer + kv + 1] if feeds else None, be.interpret)
            parts[kv].append(side)
    sides = [cg._cat_sides(parts[kv], modes[kv]) for kv in (0, 1)]
    return q, sides, lv.to(torch.int64), used


_PARALLEL_ZLIB = 1 << 16  # raw bytes of an older container's zlib sections 1-4 above which they inflate on threads


@functools.lru_cache(maxsize=1)
def _zlib_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Four threads (one per zlib section of an older container), shared by every codec in the process."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvmesh-zlib")


# ---- decode -------------------------------------------------------------------------------------

@triton.jit
def _restore_rows_kernel(blob_ptr, mask_ptr, pos_ptr, n_ptr, off, out_ptr, bad_ptr, n_rows, R, T, lead, C,
                         BLOCK_R: tl.constexpr, CPAD: tl.constexpr):
    """Section 7 read back: each masked rest row r (p-th of n) gets lo16, hi16 and its symbols from the
    blob (off = where the rows start, after the mask) dequantized with mode 1 at 256 levels, written into
    out [2, L, T, C] at token lead + r % R, in out's dtype; a non-finite bound sets bad_ptr[0]."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n_rows
    sel = tl.load(mask_ptr + r, mask=rm, other=0) != 0
    p = tl.load(pos_ptr + r, mask=rm, other=0)
    n = tl.load(n_ptr)
    lo_at = off + 2 * p
    hi_at = off + 2 * n + 2 * p
    lob = tl.load(blob_ptr + lo_at, mask=sel, other=0).to(tl.int32) | (tl.load(blob_ptr + lo_at + 1, mask=sel, other=0).to(tl.int32) << 8)
    hib = tl.load(blob_ptr + hi_at, mask=sel, other=0).to(tl.int32) | (tl.load(blob_ptr + hi_at + 1, mask=sel, other=0).to(tl.int32) << 8)
    lo16 = lob.to(tl.int16).to(tl.float16, bitcast=True)
    hi16 = hib.to(tl.int16).to(tl.float16, bitcast=True)
    lo = lo16.to(tl.float32)
    hi = hi16.to(tl.float32)
    finite = (tl.abs(lo) < float("inf")) & (tl.abs(hi) < float("inf"))
    tl.atomic_max(bad_ptr + tl.zeros_like(r), (~finite).to(tl.int32), mask=sel)
    c = tl.arange(0, CPAD)
    m = sel[:, None] & (c < C)[None, :]
    q = tl.load(blob_ptr + off + 4 * n + p[:, None] * C + c[None, :], mask=m, other=0)
    y = tq._dequantize(q, lo[:, None], (hi - lo)[:, None], 256.0)
    row = (r // R).to(tl.int64) * T + lead + r % R
    tl.store(out_ptr + row[:, None] * C + c[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


# the order codec.py's decode checks things in: the first failed check names the error
_ERRORS = (
    container.CHECKSUM_MISMATCH,
    *(f"corrupt cachegen container: {what} section: {sidecode._ERRORS[5]}"
      for what in ("lead token", "side information", "side information", "stream meta")),
    "corrupt cachegen container: negative quantization span",
    "corrupt cachegen container: non-finite quantization side information",
    "corrupt cachegen container: stream center or table index out of range",
    "corrupt cachegen container: stream word counts do not match the stored words",
    "corrupt rANS data: stream {k}: it does not end in the initial state having read exactly its words",
    "corrupt cachegen container: protected mask has padding bits set",
    "corrupt cachegen container: protected section has the wrong size",
    "corrupt cachegen container: non-finite quantization side information",
)


@dataclass
class _Plan:
    """What the host reads from a container's header and small sections before the device runs."""
    L: int
    T: int
    C: int
    lead: int
    modes: tuple[int, int]
    levels: np.ndarray
    group: int
    offsets: list[int]  # byte offset of each section in the blob
    lengths: tuple[int, ...]
    raw: list[bytes] | None  # sections 1-4 as raw bytes (inflated: containers with zlib sections)
    coded: dsc.DecodePlan | None  # sections 1-4 in their coded form (variant bit 2): read on the device
    protected: bool  # section 7 present and to be read
    used: np.ndarray | None = None  # section 8's flags uint8 [2, L] (cross-layer prediction), read by the host


def _plan(codec: object, blob: bytes | bytearray | memoryview) -> _Plan | None:
    """Host checks of everything but the checksum and the streams (codec.decode's, in its words), or None
    for containers the device pipeline leaves to codec.py (no rest tokens)."""
    from kvmesh.codecs.cachegen import codec as cg
    from kvmesh.codecs.registry import method_for_ids

    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CodecError(f"blob must be bytes, got {type(blob).__name__}")
    header, sections = container.unpack_unverified(blob)
    if header.codec_id != codec.codec_id:
        raise CodecError(f"container was written by codec {method_for_ids(header.codec_id, header.level_id)!r}, "
                         f"not {codec.name!r}")
    allowed = ((cg.N_SECTIONS, cg.N_SECTIONS_PROTECTED) if codec.level.protects else (cg.N_SECTIONS,)) \
        + (cg.N_SECTIONS_PREDICTED,)
    if len(sections) not in allowed:
        raise CodecError(f"corrupt container: {len(sections)} sections, {codec.name} writes "
                         f"{' or '.join(map(str, allowed))}")
    if header.shape[0] != 2 or any(d < 1 for d in header.shape):
        raise CodecError(f"corrupt container: bad shape {header.shape}")
    _, L, T, C = header.shape
    variant = cg._read_variant(sections, L)
    params, lead_raw, kside, vside, meta, lens = sections[:6]
    used = codec.predicted_flags(sections, L, C) if variant & cg.VARIANT_PREDICTED else None
    if cg._PARAMS.unpack_from(params, 0)[4] >= T:
        return None  # no rest tokens: codec.py's path decodes these
    kmode, vmode, lead, group, levels = cg.read_params(params, L, T, C)
    if len(lead_raw) > cg.lead_bytes(L, lead, C) or (len(lead_raw) == 0) != (lead == 0):
        raise CodecError("corrupt cachegen container: lead token section has the wrong size")
    rest = T - lead
    if len(meta) > 4 * L * C * quant.num_segments(rest):
        raise CodecError("corrupt cachegen container: stream meta section is too long")
    for raw, mode in ((kside, kmode), (vside, vmode)):
        if not 0 < len(raw) <= cg.side_bytes(mode, L, rest, C):
            raise CodecError("corrupt cachegen container: side information has the wrong size")
    n_coded = 2 * L * C * quant.num_segments(rest) // group
    offsets, pos = [], container.FIXED_HEADER_BYTES + 4 * len(sections)
    for n in header.section_lengths:
        offsets.append(pos)
        pos += n
    jobs = [(cg.unpack_side, lead_raw, cg.lead_bytes(L, lead, C), "lead token"),
            (cg.unpack_side, kside, cg.side_bytes(kmode, L, rest, C), "side information"),
            (cg.unpack_side, vside, cg.side_bytes(vmode, L, rest, C), "side information"),
            (cg.unpack_meta, meta, 2 * n_coded * group, "stream meta")]
    raws, coded = None, None
    if variant & cg.VARIANT_CODED:  # the planes' headers here, their blocks on the device
        planes = [sidecode.parse(stored, n, i + 1, what) for i, (_, stored, n, what) in enumerate(jobs)]
        coded = dsc.decode_plan(offsets[1:5], [j[2] for j in jobs], planes)
    else:
        inflate = (lambda job: bytes(job[0](*job[1:])))
        big = sum(len(j[1]) for j in jobs) >= _PARALLEL_ZLIB // 4
        # zlib releases the GIL: the four sections inflate side by side (the host's share of a decode)
        raws = list(_zlib_pool().map(inflate, jobs) if big else map(inflate, jobs))
    if len(lens) < cg._COUNTS.size:
        raise CodecError("corrupt cachegen container: stream lengths section too short")
    _, width = cg._COUNTS.unpack_from(lens, 0)
    if width > 16 or len(lens) != cg._COUNTS.size + (n_coded * width + 7) // 8:
        raise CodecError("corrupt cachegen container: stream lengths section has the wrong size")
    protected = bool(variant & cg.VARIANT_BITS) and (codec.level.protects or len(sections[cg.N_SECTIONS]) > 0)
    if protected and len(sections[cg.N_SECTIONS]) < (2 * L * rest + 7) // 8:
        raise CodecError("corrupt cachegen container: protected section shorter than its mask")
    return _Plan(L, T, C, lead, (kmode, vmode), levels, group, offsets, header.section_lengths, raws, coded,
                 protected, used)


def decode(codec: object, blob: bytes | bytearray | memoryview) -> torch.Tensor | None:
    """CacheGenCodec.decode on the Triton backend, or None for containers it leaves to codec.py. Raises
    the CodecError codec.py would (a container whose checksum fails: the checksum error first)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CodecError(f"blob must be bytes, got {type(blob).__name__}")
    header = container.read_header_unverified(blob)  # the structure first, as codec.py's reader
    try:
        plan = _plan(codec, blob)
    except CodecError:
        if zlib.crc32(memoryview(blob)[:len(blob) - container.CRC_BYTES]) != container.stored_crc(blob):
            raise CodecError(container.CHECKSUM_MISMATCH) from None  # what codec.py says first
        raise
    if plan is None:
        return None
    return _decode_on_device(codec, blob, plan, header.dtype)


def _decode_on_device(codec: object, blob: bytes | bytearray | memoryview, plan: _Plan,
                      dtype: torch.dtype) -> torch.Tensor:
    from kvmesh.codecs.cachegen import codec as cg

    be = codec.backend
    dev = be.device
    L, T, C, lead = plan.L, plan.T, plan.C, plan.lead
    rest = T - lead
    # sections 1-4 raw, each at a 4-byte aligned offset of `extra` (so fp16/fp32 views need no copy)
    sizes = [len(r) for r in plan.raw] if plan.raw is not None else plan.coded.sizes
    starts, pos = [], 0
    for n in sizes:
        starts.append(pos)
        pos += n + (-n) % 4
    flags = torch.zeros(len(_ERRORS), dtype=torch.int64, device=dev)
    if plan.raw is not None:  # inflated on the host (zlib sections: containers written before 2026-12-03)
        tail = b"".join(r + bytes((-len(r)) % 4) for r in plan.raw)
    else:
        tail = plan.coded.extra
    b, tail_d = to_device([memoryview(blob), tail], dev, "blob")  # the one copy in
    if plan.raw is not None:
        extra = tail_d
    else:
        raws, bad = dsc.decode(b, tail_d, plan.coded, be.interpret)
        flags[1:5] = bad
        extra = torch.empty(pos, dtype=torch.uint8, device=dev)
        for start, r in zip(starts, raws):
            extra[start:start + r.numel()].copy_(r)
    n_body = len(blob) - container.CRC_BYTES
    want = container.stored_crc(blob) ^ dcrc.crc32_zeros(n_body)
    crc = dcrc.raw_crc(b, 0, torch.full((1,), n_body, dtype=torch.int64, device=dev), n_body, be.interpret)
    flags[0] = (crc.to(torch.int64) & 0xFFFFFFFF) != want

    def tensors(start: int, spec: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
        out, at = [], start
        for shape, dt in spec:
            n = int(np.prod(shape)) * (2 if dt == torch.float16 else 4)
            t = extra[at:at + n]
            t = (t if at % 4 == 0 else t.clone()).view(dt).reshape(shape)
            if dt == torch.float32:
                flags[5] |= (t < 0).any()
            flags[6] |= ~torch.isfinite(t).all()
            out.append(t)
            at += n
        return out

    lspec = quant.side_spec(quant.MODE_TOKEN, L, lead, C)
    nside = cg.side_bytes(quant.MODE_TOKEN, L, lead, C)
    lk, lv = tensors(starts[0], lspec), tensors(starts[0] + nside, lspec)
    lq = extra[starts[0] + 2 * nside: starts[0] + 2 * nside + 2 * L * lead * C].reshape(2, L, lead, C)
    kmode, vmode = plan.modes
    sides = [tensors(starts[1], quant.side_spec(kmode, L, rest, C)),
             tensors(starts[2], quant.side_spec(vmode, L, rest, C))]
    layout = stream_layout(L, rest, C, plan.levels, plan.group)
    ll = be.layout_lanes(layout)
    S = layout.num_streams
    meta = extra[starts[3]:starts[3] + 2 * S]
    center, tb = meta[:S], meta[S:]
    dflags = tb >= delta.DELTA_FLAG
    table = tb & delta.TABLE_MASK
    ok = (center.to(torch.int32) < ll.alpha) & (table < 64)
    flags[7] = ~ok.all()
    center = torch.where(ok, center, torch.zeros_like(center))
    table = torch.where(ok, table, torch.zeros_like(table))

    counts = _unpack_counts(b, plan.offsets[5], layout.num_coded, blob)
    len6 = plan.lengths[6]
    good = (counts >= 2).all() & (counts <= ll.coded_lengths + 2).all() & (2 * counts.sum() == len6)
    flags[8] = ~good
    counts = torch.where(good, counts, torch.zeros_like(counts)).to(torch.int32)  # 0: the kernel reads nothing
    o6 = plan.offsets[6]
    words = b[o6:o6 + len6]
    words = (words if o6 % 2 == 0 else words.clone()).view(torch.uint16)
    q, status = be.rans_decode_device(words, counts, center, table, layout)
    bad = status == 0
    flags[9] = bad.sum()
    first_bad = torch.argmax(bad.to(torch.int32)).reshape(1).to(torch.int64)
    q = delta.inverse(q, ll.alphabet, dflags)  # any stream may be a delta stream (bit 7 of its table byte)
    out = torch.empty(2, L, T, C, dtype=dtype, device=dev)
    if lead:  # lead 0 (a chunk that does not start a sequence, CacheGenCodec.for_chunk): nothing to launch
        out[:, :, :lead] = be.dequantize(lq, [lk, lv], np.full((2, L), cg.LEAD_LEVELS), cg.LEAD_MODES, dtype=dtype)
    if plan.used is None:
        out[:, :, lead:] = be.dequantize(q, sides, plan.levels, plan.modes, dtype=dtype)
        if plan.protected:
            _restore_rows(b, plan, out, flags, be.interpret)
    else:  # the residuals in fp32, the protected rows, then the predictions layer by layer
        rest_out = be.dequantize(q, sides, plan.levels, plan.modes, dtype=torch.float32)
        mask = _restore_rows(b, plan, rest_out, flags, be.interpret, lead=0) if plan.protected else None
        _add_predictions(be, codec.predictor, rest_out, plan.used, mask)
        out[:, :, lead:] = rest_out
    info = to_host(torch.cat([flags, first_bad]), "flags")
    for i, f in enumerate(info[:len(_ERRORS)]):
        if f:
            raise CodecError(_ERRORS[i].format(k=int(info[-1])))
    return out


def _unpack_counts(b: torch.Tensor, off: int, n: int, blob: bytes | bytearray | memoryview) -> torch.Tensor:
    """codec.unpack_uints on the device: section 5 at byte off of the blob b -> int64 [n]. The base and
    width (3 bytes, sizes already checked) are read from the host's copy."""
    base, width = struct.unpack_from("<HB", blob, off)
    if width == 0:
        return torch.full((n,), base, dtype=torch.int64, device=b.device)
    nbytes = (n * width + 7) // 8
    raw = b[off + 3: off + 3 + nbytes]
    bits = (raw[:, None].to(torch.int64) >> torch.arange(8, device=b.device)) & 1
    v = bits.reshape(-1)[:n * width].reshape(n, width) << torch.arange(width, device=b.device)
    return v.sum(dim=1) + base


def _restore_rows(b: torch.Tensor, plan: _Plan, out: torch.Tensor, flags: torch.Tensor, interpret: bool,
                  lead: int | None = None) -> torch.Tensor:
    """Section 7 on the device: its checks as flags 10-12, its rows written over out's rest tokens (out
    [2, L, T, C] with the lead tokens first, or lead=0: out holds the rest tokens alone). Returns the
    mask uint8 [2, L, rest] of the rows written (none where the section's size is wrong)."""
    L, C = plan.L, plan.C
    rest = plan.T - plan.lead
    T = out.shape[2]
    lead = plan.lead if lead is None else lead
    rows = 2 * L * rest
    nmask = (rows + 7) // 8
    o7, len7 = plan.offsets[7], plan.lengths[7]
    bits = ((b[o7:o7 + nmask, None].to(torch.int32) >> torch.arange(8, device=b.device)) & 1).reshape(-1)
    flags[10] = bits[rows:].any() if bits.numel() > rows else False
    mask = bits[:rows]
    n = mask.sum().to(torch.int64).reshape(1)
    size_ok = (nmask + n * (4 + C)) == len7
    flags[11] = ~size_ok
    mask = torch.where(size_ok, mask, torch.zeros_like(mask)).to(torch.uint8)  # a bad size reads no row
    pos = torch.cumsum(mask.to(torch.int64), 0) - 1
    bad = torch.zeros(1, dtype=torch.int32, device=b.device)
    cpad = triton.next_power_of_2(C)
    block_r = max(1, min(256 if interpret else 16, 4096 // cpad))
    _restore_rows_kernel[(triton.cdiv(rows, block_r),)](b, mask, pos, n, o7 + nmask, out, bad, rows, rest, T, lead, C,
                                                       BLOCK_R=block_r, CPAD=cpad, **tq._opts(interpret, 4))
    flags[12] = bad[0].to(torch.int64)
    return mask.reshape(2, L, rest)


def _add_predictions(be: object, predictor: LayerPredictor, out: torch.Tensor, used: np.ndarray,
                     keep: torch.Tensor | None) -> None:
    """codec.CacheGenCodec._add_predictions on the device, with no host read: out fp32 [2, L, R, C] holds
    the dequantized residuals with the protected rows already restored (keep uint8 [2, L, R]: those
    rows, or None); each layer section 8 flags (used, read by the host) gets its prediction added, in
    the arithmetic its flag names, in the encoder's order (K then V, layer by layer), except on its
    protected rows (the CPU adds, then puts the rows back: the same values). Fixed-point layers: one
    kernel each (triton_quant.predict_layer), which makes the parts' int16 features on the fly from
    their largest magnitudes, kept on the device as fp32 bit patterns: top[0] of every layer as
    dequantized (one reduction), top[1] of each layer once its prediction is added (by that kernel)."""
    _, L, R, C = out.shape
    flat = out.view(2 * L, R, C)
    top = None
    if (used == FLAG_FIXED).any():
        lo, hi = torch.aminmax(flat.view(2 * L, R * C), dim=1)
        top = torch.zeros(2, L, 2, dtype=torch.int32, device=out.device)  # [predicted?, layer, K/V]
        top[0] = torch.maximum(lo.abs(), hi.abs()).view(torch.int32).view(2, L).T
    for layer in range(1, L):
        for kv in (0, 1):
            flag = int(used[kv, layer])
            if not flag:
                continue
            rows = keep[kv, layer] if keep is not None else None
            if flag == FLAG_FIXED:
                w, sw, b = be.fixed_weights(predictor, kv, layer)
                parts = [(0, layer - 1), (1, layer - 1), (0, layer)][:2 + kv]
                tq.predict_layer(out, w, sw, b, [k * L + lay for k, lay in parts],
                                 [bool(used[k, lay]) * 2 * L + 2 * lay + k for k, lay in parts], kv * L + layer,
                                 2 * L + 2 * layer + kv, top, rows, be.interpret)
            else:  # fp32 prediction (containers written before 2026-12-03): torch glue around the kernel
                y = flat[kv * L + layer]
                new = y + be.predict(features(out, kv, layer), predictor, kv, layer)
                y.copy_(torch.where(rows[:, None] != 0, y, new) if rows is not None else new)
                if top is not None:
                    top.view(-1)[2 * L + 2 * layer + kv] = y.abs().amax().view(torch.int32)
