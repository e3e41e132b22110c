"""Triton twins of quant.py's quantize/dequantize: the same IEEE fp32 operations, in the same order.

Bit-exactness rules: every kernel is launched with enable_fp_fusion=False (a*b+c must stay two
roundings, not one FMA), divisions use tl.div_rn (IEEE; plain `/` is approximate on NVIDIA), fp32 ->
fp16 conversions round to nearest even as torch does, and min/max reductions are order-independent.

Tiles: the per-(layer, segment, channel) mode reduces a [256 tokens, BLOCK_C channels] tile over
tokens; the per-token modes reduce a [BLOCK_T tokens, CPAD channels] tile over channels. Either way
each tile row is a contiguous run of memory.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kvmesh.codecs.cachegen import quant

SEGMENT = tl.constexpr(quant.SEGMENT)


@triton.jit
def _round_down_fp16(v):
    """The largest fp16 value <= v (quant.fp16_round_down)."""
    h = v.to(tl.float16)
    too_big = h.to(tl.float32) > v
    b = h.to(tl.int16, bitcast=True)
    down = tl.where(h > 0, b - 1, tl.where(h < 0, b + 1, -32767)).to(tl.int16)
    return tl.where(too_big, down, b).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _round_up_fp16(v):
    return -_round_down_fp16(-v)


@triton.jit
def _quantize(x, lo, d, lv):
    """FORMAT.md §3: inv = d > 0 ? Bm1 / d : 0; t = x - lo; t *= inv; t += 0.5; q = clamp(floor(t))."""
    bm1 = lv - 1.0
    flat = d > 0
    inv = tl.div_rn(bm1, tl.where(flat, d, 1.0))
    inv = tl.where(flat, inv, 0.0)
    t = x - lo
    t = t * inv
    t = t + 0.5
    q = tl.floor(t)
    q = tl.minimum(tl.maximum(q, 0.0), bm1)
    return q.to(tl.uint8)


@triton.jit
def _dequantize(q, lo, d, lv):
    step = tl.div_rn(d, lv - 1.0)
    y = q.to(tl.float32) * step
    return y + lo


@triton.jit
def _quant_channel_kernel(x_ptr, q_ptr, side_ptr, aux_ptr, lv_ptr, T, C, nseg, L,
                          PHASE: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (layer, segment) x BLOCK_C channels.

    PHASE 0 (mode 0): bounds lo16 = rd16(min), hi16 = ru16(max) over the segment's tokens into
    side [2, L, nseg, C], then quantize with lo = f32(lo16), d = f32(hi16) - lo.
    PHASE 1 (mode 3, first pass): lo16 into side [L, nseg, C] and f32(hi16) - f32(lo16) into aux.
    PHASE 2 (mode 3, second pass): quantize with lo = f32(lo16) and d = aux[layer, segment] (the max).
    """
    pid = tl.program_id(0)
    layer = pid // nseg
    seg = pid % nseg
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t = seg * SEGMENT + tl.arange(0, SEGMENT)
    cm = c < C
    m = (t < T)[:, None] & cm[None, :]
    off = (layer.to(tl.int64) * T + t[:, None]) * C + c[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    side = (layer * nseg + seg) * C + c
    if PHASE == 2:
        lo = tl.load(side_ptr + side, mask=cm, other=0.0).to(tl.float32)
        d = tl.load(aux_ptr + layer * nseg + seg)
        lv = tl.load(lv_ptr + layer)
        tl.store(q_ptr + off, _quantize(x, lo[None, :], d, lv), mask=m)
    else:
        # (channels past C would reduce to +-inf; zero them so the masked-out lanes stay finite)
        lo16 = _round_down_fp16(tl.where(cm, tl.min(tl.where(m, x, float("inf")), axis=0), 0.0))
        hi16 = _round_up_fp16(tl.where(cm, tl.max(tl.where(m, x, float("-inf")), axis=0), 0.0))
        lo = lo16.to(tl.float32)
        d = hi16.to(tl.float32) - lo
        tl.store(side_ptr + side, lo16, mask=cm)
        if PHASE == 0:
            tl.store(side_ptr + L * nseg * C + side, hi16, mask=cm)
            lv = tl.load(lv_ptr + layer)
            tl.store(q_ptr + off, _quantize(x, lo[None, :], d[None, :], lv), mask=m)
        else:
            tl.store(aux_ptr + side, d, mask=cm)


@triton.jit
def _quant_token_kernel(x_ptr, q_ptr, side_ptr, lv_ptr, T, C, L, SYM: tl.constexpr,
                        BLOCK_T: tl.constexpr, CPAD: tl.constexpr):
    """BLOCK_T tokens of one layer: bounds over the channels of each token, then quantize.
    Mode 1: side [2, L, T] = rd16(min), ru16(max); mode 2 (SYM): side [L, T] = a = ru16(max |x|)."""
    layer = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, CPAD)
    m = (t < T)[:, None] & (c < C)[None, :]
    off = (layer.to(tl.int64) * T + t[:, None]) * C + c[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    tm = t < T
    row = layer.to(tl.int64) * T + t
    if SYM:
        a16 = _round_up_fp16(tl.where(tm, tl.max(tl.where(m, tl.abs(x), float("-inf")), axis=1), 0.0))
        tl.store(side_ptr + row, a16, mask=tm)
        a = a16.to(tl.float32)
        lo = -a
        d = a - lo
    else:
        lo16 = _round_down_fp16(tl.where(tm, tl.min(tl.where(m, x, float("inf")), axis=1), 0.0))
        hi16 = _round_up_fp16(tl.where(tm, tl.max(tl.where(m, x, float("-inf")), axis=1), 0.0))
        tl.store(side_ptr + row, lo16, mask=tm)
        tl.store(side_ptr + L * T + row, hi16, mask=tm)
        lo = lo16.to(tl.float32)
        d = hi16.to(tl.float32) - lo
    lv = tl.load(lv_ptr + layer)
    tl.store(q_ptr + off, _quantize(x, lo[:, None], d[:, None], lv), mask=m)


@triton.jit
def _dequant_channel_kernel(q_ptr, out_ptr, side_ptr, aux_ptr, lv_ptr, T, C, nseg, L,
                            SHARED: tl.constexpr, BLOCK_C: tl.constexpr):
    """Modes 0 (d = f32(hi16) - lo per channel) and 3 (SHARED: d = aux[layer, segment])."""
    pid = tl.program_id(0)
    layer = pid // nseg
    seg = pid % nseg
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t = seg * SEGMENT + tl.arange(0, SEGMENT)
    cm = c < C
    m = (t < T)[:, None] & cm[None, :]
    off = (layer.to(tl.int64) * T + t[:, None]) * C + c[None, :]
    side = (layer * nseg + seg) * C + c
    lo = tl.load(side_ptr + side, mask=cm, other=0.0).to(tl.float32)
    if SHARED:
        d = tl.load(aux_ptr + layer * nseg + seg)
    else:
        d = tl.load(side_ptr + L * nseg * C + side, mask=cm, other=0.0).to(tl.float32) - lo
        d = d[None, :]
    lv = tl.load(lv_ptr + layer)
    q = tl.load(q_ptr + off, mask=m, other=0)
    y = _dequantize(q, lo[None, :], d, lv)
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dequant_token_kernel(q_ptr, out_ptr, side_ptr, lv_ptr, T, C, L, SYM: tl.constexpr,
                          BLOCK_T: tl.constexpr, CPAD: tl.constexpr):
    layer = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, CPAD)
    m = (t < T)[:, None] & (c < C)[None, :]
    off = (layer.to(tl.int64) * T + t[:, None]) * C + c[None, :]
    tm = t < T
    row = layer.to(tl.int64) * T + t
    if SYM:
        a = tl.load(side_ptr + row, mask=tm, other=0.0).to(tl.float32)
        lo = -a
        d = a - lo
    else:
        lo = tl.load(side_ptr + row, mask=tm, other=0.0).to(tl.float32)
        d = tl.load(side_ptr + L * T + row, mask=tm, other=0.0).to(tl.float32) - lo
    lv = tl.load(lv_ptr + layer)
    q = tl.load(q_ptr + off, mask=m, other=0)
    y = _dequantize(q, lo[:, None], d[:, None], lv)
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _round_keys_kernel(x_ptr, q_ptr, lo_ptr, inv_ptr, step_ptr, bm1_ptr, cols_ptr, f_ptr, r_ptr, T, C, nseg, H,
                       D: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Query-aware key rounding (FORMAT.md section 3) for BLOCK_T tokens of one (layer, KV head): the head's D channels in the
    profile's order (cols) as a [BLOCK_T, DPAD] tile u; per k, channel k's column is read out (a sum of
    one value and zeros: exact), rounded on its grid, and its error fed to the whole tile along row k
    of the upper triangular factor (columns already rounded get e * 0 and are never read again).
    lo, inv, step fp32 [L, nseg, C]; bm1 fp32 [L]; cols int64 [L, C]; f fp32 [L, H, D, D]; r fp32 [L, H, D]."""
    pid = tl.program_id(0)
    layer = pid // H
    head = pid % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    kk = tl.arange(0, DPAD)
    tm = t < T
    km = kk < D
    base = layer.to(tl.int64) * C + head * D
    chan = tl.load(cols_ptr + base + kk, mask=km, other=0)
    row = (layer.to(tl.int64) * T + t) * C
    u = tl.load(x_ptr + row[:, None] + chan[None, :], mask=tm[:, None] & km[None, :], other=0.0).to(tl.float32)
    grp = (layer.to(tl.int64) * nseg + t // SEGMENT) * C
    top = tl.load(bm1_ptr + layer)
    fbase = (layer.to(tl.int64) * H + head) * D
    for k in range(D):
        ck = tl.load(cols_ptr + base + k)
        uk = tl.sum(tl.where((kk == k)[None, :], u, 0.0), axis=1)
        lo = tl.load(lo_ptr + grp + ck, mask=tm, other=0.0)
        inv = tl.load(inv_ptr + grp + ck, mask=tm, other=0.0)
        step = tl.load(step_ptr + grp + ck, mask=tm, other=0.0)
        v = uk - lo
        v = v * inv
        v = v + 0.5
        v = tl.minimum(tl.maximum(tl.floor(v), 0.0), top)
        tl.store(q_ptr + row + ck, v.to(tl.uint8), mask=tm)
        y = v * step
        y = y + lo
        e = uk - y
        e = e * tl.load(r_ptr + fbase + k)
        frow = tl.load(f_ptr + (fbase + k) * D + kk, mask=km, other=0.0)
        u = u - e[:, None] * frow[None, :]


# ---- host side ------------------------------------------------------------------------------------

def _opts(interpret: bool, warps: int) -> dict:
    return {} if interpret else {"enable_fp_fusion": False, "num_warps": warps}


def _token_tile(c: int, interpret: bool) -> tuple[int, int]:
    cpad = triton.next_power_of_2(c)
    return max(1, (65536 if interpret else 4096) // cpad), cpad


def quantize(x: torch.Tensor, levels: torch.Tensor, mode: int, interpret: bool = False,
             q: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """quant.quantize on the device: x [L, T, C] (fp16/bf16/fp32), levels fp32 [L] on the same device ->
    (q uint8 [L, T, C], side tensors as quant.side_spec); q may be given (contiguous)."""
    L, T, C = x.shape
    x = x.contiguous()
    dev = x.device
    if q is None:
        q = torch.empty(L, T, C, dtype=torch.uint8, device=dev)
    side = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in quant.side_spec(mode, L, T, C)]
    if mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP):
        nseg = quant.num_segments(T)
        block_c = min(256 if interpret else 64, triton.next_power_of_2(C))
        grid = (L * nseg, triton.cdiv(C, block_c))
        if mode == quant.MODE_CHANNEL:
            _quant_channel_kernel[grid](x, q, side[0], side[0], levels, T, C, nseg, L, PHASE=0, BLOCK_C=block_c,
                                        **_opts(interpret, 8))
        else:
            span = torch.empty(L, nseg, C, dtype=torch.float32, device=dev)
            _quant_channel_kernel[grid](x, q, side[0], span, levels, T, C, nseg, L, PHASE=1, BLOCK_C=block_c,
                                        **_opts(interpret, 8))
            torch.amax(span, dim=2, out=side[1])  # exact: a max of fp32 values
            _quant_channel_kernel[grid](x, q, side[0], side[1], levels, T, C, nseg, L, PHASE=2, BLOCK_C=block_c,
                                        **_opts(interpret, 8))
    elif mode in (quant.MODE_TOKEN, quant.MODE_TOKEN_SYMMETRIC):
        block_t, cpad = _token_tile(C, interpret)
        block_t = min(block_t, triton.next_power_of_2(T))
        _quant_token_kernel[(L, triton.cdiv(T, block_t))](x, q, side[0], levels, T, C, L,
                                                          SYM=mode == quant.MODE_TOKEN_SYMMETRIC,
                                                          BLOCK_T=block_t, CPAD=cpad, **_opts(interpret, 4))
    else:
        raise ValueError(f"unknown quantization mode {mode}")
    return q, side


def dequantize(q: torch.Tensor, side: list[torch.Tensor], levels: torch.Tensor, mode: int, dtype: torch.dtype,
               interpret: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """quant.dequantize on the device, written straight in `dtype` (fp32 result rounded as .to does)."""
    L, T, C = q.shape
    q = q.contiguous()
    if out is None:
        out = torch.empty(L, T, C, dtype=dtype, device=q.device)
    side = [s.contiguous() for s in side]
    if mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP):
        nseg = quant.num_segments(T)
        block_c = min(256 if interpret else 64, triton.next_power_of_2(C))
        shared = mode == quant.MODE_CHANNEL_SHARED_STEP
        _dequant_channel_kernel[(L * nseg, triton.cdiv(C, block_c))](q, out, side[0], side[1] if shared else side[0],
                                                                     levels, T, C, nseg, L, SHARED=shared,
                                                                     BLOCK_C=block_c, **_opts(interpret, 8))
    elif mode in (quant.MODE_TOKEN, quant.MODE_TOKEN_SYMMETRIC):
        block_t, cpad = _token_tile(C, interpret)
        block_t = min(block_t, triton.next_power_of_2(T))
        _dequant_token_kernel[(L, triton.cdiv(T, block_t))](q, out, side[0], levels, T, C, L,
                                                            SYM=mode == quant.MODE_TOKEN_SYMMETRIC,
                                                            BLOCK_T=block_t, CPAD=cpad, **_opts(interpret, 4))
    else:
        raise ValueError(f"unknown quantization mode {mode}")
    return out


def levels_tensor(levels: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(levels, dtype=np.float32)).to(device)


def round_keys(x: torch.Tensor, side: list[torch.Tensor], levels: torch.Tensor, mode: int, profile: object,
               interpret: bool = False, q: torch.Tensor | None = None) -> torch.Tensor:
    """Query-aware key rounding on the device: keys x [L, T, C] on the grid of their side tensors,
    rounded along the profile (a rounding.QueryProfile); q uint8 [L, T, C] (written into q if given)."""
    from kvmesh.codecs.cachegen.rounding import check_mode, device_factors

    L, T, C = x.shape
    profile.check(L, C)
    check_mode(mode)
    dev = x.device
    nseg = quant.num_segments(T)
    lo, inv, step, bm1 = quant.grid(side, levels, mode)
    flat = (lambda v: v.to(torch.float32).expand(L, nseg, 1, C).reshape(L, nseg, C).contiguous())
    cols, factor, recip = device_factors(profile, dev)
    if q is None:
        q = torch.empty(L, T, C, dtype=torch.uint8, device=dev)
    H, D = profile.kv_heads, profile.head_dim
    block_t = min(256 if interpret else 32, triton.next_power_of_2(T))
    _round_keys_kernel[(L * H, triton.cdiv(T, block_t))](
        x.contiguous(), q, flat(lo), flat(inv), flat(step), bm1.reshape(L).contiguous(), cols, factor, recip,
        T, C, nseg, H, D=D, DPAD=triton.next_power_of_2(D), BLOCK_T=block_t, **_opts(interpret, 4))
    return q


@triton.jit
def _predict_kernel(x_ptr, w_ptr, b_ptr, out_ptr, R, F, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # predict.py's arithmetic: acc = b; acc = acc + x[:, i] * w[i] for i = 0 .. F-1 (unfused fp32)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < R
    cm = cols < C
    b = tl.load(b_ptr + cols, mask=cm, other=0.0)
    acc = tl.broadcast_to(b[None, :], (BLOCK_R, BLOCK_C))  # not 0 + b: that turns -0.0 into +0.0
    for i in range(0, F):
        xi = tl.load(x_ptr + rows * F + i, mask=rm, other=0.0)
        wi = tl.load(w_ptr + i * C + cols, mask=cm, other=0.0)
        acc = acc + xi[:, None] * wi[None, :]
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], acc, mask=rm[:, None] & cm[None, :])


def _predict_blocks(R: int, C: int, interpret: bool) -> tuple[int, int]:
    """(rows, columns) of a prediction kernel's tile: interpreted, few large programs are fast; compiled,
    small tiles keep the accumulator in registers."""
    return min(triton.next_power_of_2(R), 256 if interpret else 32), min(triton.next_power_of_2(C), 256 if interpret else 64)


def predict(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, interpret: bool = False) -> torch.Tensor:
    """The cross-layer prediction (FORMAT.md section 3) on the device: x fp32 [R, F], w fp32 [F, C], b fp32 [C] -> [R, C]."""
    R, F = x.shape
    C = w.shape[1]
    out = torch.empty(R, C, dtype=torch.float32, device=x.device)
    if R == 0:
        return out
    block_r, block_c = _predict_blocks(R, C, interpret)
    _predict_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        x.contiguous(), w.contiguous(), b.contiguous(), out, R, F, C, BLOCK_R=block_r, BLOCK_C=block_c,
        **_opts(interpret, 4))
    return out


@triton.jit
def _predict_fixed_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, P, R, K, C, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    # predict.py's fixed-point arithmetic: per part an exact int32 dot product (any order), then
    # acc = acc + float(dot) * 2^-(sx + sw) in part order from acc = b (unfused fp32)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < R
    cm = cols < C
    b = tl.load(b_ptr + cols, mask=cm, other=0.0)
    acc = tl.broadcast_to(b[None, :], (BLOCK_R, BLOCK_C))
    for p in range(0, P):
        dot = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
        for i in range(0, K):
            xi = tl.load(x_ptr + (p * R + rows) * K + i, mask=rm, other=0).to(tl.int32)
            wi = tl.load(w_ptr + (p * K + i) * C + cols, mask=cm, other=0).to(tl.int32)
            dot += xi[:, None] * wi[None, :]
        scale = tl.load(s_ptr + p * C + cols, mask=cm, other=0.0)
        acc = acc + dot.to(tl.float32) * scale[None, :]
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], acc, mask=rm[:, None] & cm[None, :])


def predict_fixed(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, b: torch.Tensor,
                  interpret: bool = False) -> torch.Tensor:
    """The fixed-point prediction (FORMAT.md section 3) on the device: x int16 [P, R, K] (the parts'
    features), w int16 [P * K, C], scale fp32 [P, C] (predict.part_scales), b fp32 [C] -> fp32 [R, C]."""
    P, R, K = x.shape
    C = w.shape[1]
    out = torch.empty(R, C, dtype=torch.float32, device=x.device)
    if R == 0:
        return out
    block_r, block_c = _predict_blocks(R, C, interpret)
    _predict_fixed_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        x.contiguous(), w.contiguous(), scale.contiguous(), b.contiguous(), out, P, R, K, C, BLOCK_R=block_r,
        BLOCK_C=block_c, **_opts(interpret, 4))
    return out


@triton.jit
def _fixed_exponent(bits):
    """predict.fixed_exponent of a largest magnitude given as its fp32 bit pattern (>= 0): 15 - e with
    top < 2^e, clamped to [-16, 30]; 30 for zero and subnormals (15 - e > 30 there), 15 for inf/NaN
    (frexpf's e = 0, as the compiled coder has it)."""
    biased = (bits >> 23) & 255
    e = tl.where(biased == 255, 0, biased - 126)
    return tl.where(biased == 0, 30, tl.minimum(tl.maximum(15 - e, -16), 30))


@triton.jit
def _predict_layer_kernel(dec_ptr, out_ptr, w_ptr, sw_ptr, b_ptr, keep_ptr, top_ptr, P, R, C, o0, o1, o2, t0, t1, t2,
                          dst, tdst, ADD: tl.constexpr, KEEP: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """One predicted (K/V, layer) of a decode, in place: dec fp32 holds the decoded layers [R, C] at
    element offsets o0, o1, o2 (the parts, in feature order) and the residual at dst. Each part becomes
    its fixed-point features on the fly (X = clamp(floor(y 2^sx + 0.5)), sx from the part's largest
    magnitude: the fp32 bits at top_ptr[t_p]); the prediction is predict_fixed's arithmetic; dst gets
    residual + prediction except on its kept (protected) rows, and the largest magnitude of the result
    goes to top_ptr[tdst] (an atomic max of bit patterns: the same order as the values').
    Without ADD (an encode): the prediction alone goes to out [R, C] (dst, tdst unused)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < R
    cm = cols < C
    m = rm[:, None] & cm[None, :]
    b = tl.load(b_ptr + cols, mask=cm, other=0.0)
    acc = tl.broadcast_to(b[None, :], (BLOCK_R, BLOCK_C))
    for p in range(0, P):
        base = tl.where(p == 0, o0, tl.where(p == 1, o1, o2))
        sx = _fixed_exponent(tl.load(top_ptr + tl.where(p == 0, t0, tl.where(p == 1, t1, t2))))
        xs = ((sx + 127) << 23).to(tl.float32, bitcast=True)
        dot = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
        for i in range(0, C):
            y = tl.load(dec_ptr + base + rows.to(tl.int64) * C + i, mask=rm, other=0.0)
            v = tl.floor(y * xs + 0.5)
            xi = tl.minimum(tl.maximum(v, -32767.0), 32767.0).to(tl.int32)
            wi = tl.load(w_ptr + (p * C + i) * C + cols, mask=cm, other=0).to(tl.int32)
            dot += xi[:, None] * wi[None, :]
        k = sx + tl.load(sw_ptr + p * C + cols, mask=cm, other=0)
        scale = ((127 - k) << 23).to(tl.float32, bitcast=True)
        acc = acc + dot.to(tl.float32) * scale[None, :]
    if ADD:
        off = dst + rows.to(tl.int64)[:, None] * C + cols[None, :]
        y = tl.load(dec_ptr + off, mask=m, other=0.0)
        res = y + acc
        if KEEP:
            keep = tl.load(keep_ptr + rows, mask=rm, other=0) != 0
            res = tl.where(keep[:, None], y, res)
        tl.store(dec_ptr + off, res, mask=m)
        a = tl.where(m, tl.abs(res).to(tl.int32, bitcast=True), 0)
        tl.atomic_max(top_ptr + tdst, tl.max(tl.max(a, axis=1), axis=0))
    else:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], acc, mask=m)


def predict_layer(dec: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, b: torch.Tensor, parts: list[int],
                  tops: list[int], dst: int, tdst: int, top: torch.Tensor, keep: torch.Tensor | None,
                  interpret: bool = False, out: torch.Tensor | None = None) -> None:
    """A decode's fixed-point prediction of one (K/V, layer), added in place (_predict_layer_kernel):
    dec fp32 [n, R, C] (contiguous; parts, dst: indices of its [R, C] blocks), w int16 [P * C, C], sw int32
    [P, C], b fp32 [C], top int32 (fp32 bit patterns of each block's largest magnitude; tops, tdst:
    indices into it), keep uint8 [R] (rows left as they are) or None. One launch, no host read.
    With out (fp32 [R, C], an encode): the prediction is written there instead, dec left as it is."""
    R, C = dec.shape[-2:]
    if R == 0:
        return
    P = len(parts)
    o = [p * R * C for p in parts] + [0] * (3 - P)
    t = list(tops) + [0] * (3 - P)
    block_r, block_c = _predict_blocks(R, C, interpret)
    _predict_layer_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        dec, dec if out is None else out, w, sw, b, keep if keep is not None else top, top, P, R, C, *o, *t,
        dst * R * C, tdst, ADD=out is None, KEEP=keep is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        **_opts(interpret, 4))


# ---- the writer's residual-or-itself choice (predict.residual_levels) on the device -----------------

@triton.jit
def _residual_spans_kernel(x_ptr, p_ptr, r_ptr, ratio_ptr, part_ptr, R, C, TOKEN: tl.constexpr, SYM: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """r = x - p (fp32, as torch subtracts) for one (K/V, layer) [R, C], and the spans residual_levels
    compares. TOKEN (modes 1, 2; SYM: 2): per token (BLOCK_C >= C), ratio_ptr[t] = span(r) / span(x) in
    float64 where span(x) > 0, else +inf (sorted last: outside the quantile). Channel modes: each
    program's per-channel max and min of x and r over its BLOCK_R tokens into part [4, row blocks, C]
    (reduced by _residual_choice_kernel: min and max in any order are the same values)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < R
    cm = cols < C
    m = rm[:, None] & cm[None, :]
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0)
    r = x - tl.load(p_ptr + off, mask=m, other=0.0)
    tl.store(r_ptr + off, r, mask=m)
    if TOKEN:
        if SYM:
            sx = tl.max(tl.where(m, tl.abs(x), 0.0), axis=1)
            sr = tl.max(tl.where(m, tl.abs(r), 0.0), axis=1)
        else:
            sx = tl.max(tl.where(m, x, float("-inf")), axis=1) - tl.min(tl.where(m, x, float("inf")), axis=1)
            sr = tl.max(tl.where(m, r, float("-inf")), axis=1) - tl.min(tl.where(m, r, float("inf")), axis=1)
        ok = sx > 0
        q = sr.to(tl.float64) / tl.where(ok, sx, 1.0).to(tl.float64)  # float64 `/` is IEEE (div.rn.f64)
        tl.store(ratio_ptr + rows, tl.where(ok, q, float("inf")), mask=rm)
    else:
        nrb = tl.num_programs(0)
        at = tl.program_id(0) * C + cols
        tl.store(part_ptr + at, tl.max(tl.where(m, x, float("-inf")), axis=0), mask=cm)
        tl.store(part_ptr + nrb * C + at, tl.min(tl.where(m, x, float("inf")), axis=0), mask=cm)
        tl.store(part_ptr + 2 * nrb * C + at, tl.max(tl.where(m, r, float("-inf")), axis=0), mask=cm)
        tl.store(part_ptr + 3 * nrb * C + at, tl.min(tl.where(m, r, float("inf")), axis=0), mask=cm)


@triton.jit
def _rint(v):
    """Round half to even (numpy's rint) of a float64, exactly."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _residual_choice_kernel(ratio_ptr, part_ptr, lv_ptr, used_ptr, R, C, nrb, base, TOKEN: tl.constexpr,
                            BLOCK: tl.constexpr, CPAD: tl.constexpr):
    """predict.levels_from_spans for one (K/V, layer), in float64 as the host does it: TOKEN, the ratios
    sorted ascending (+inf for tokens without span: n = the finite ones) and their quantile_linear at
    TOKEN_RATIO_QUANTILE; else the ratio of the largest channel spans of r and x (from the spans
    kernel's per-block max/min). The count goes to lv_ptr[0] (fp32, the level count the quantize kernels
    read) when below the base, with used_ptr[0] = 1; else base stays."""
    q06 = tl.full([1], 0x3FE3333333333333, tl.int64).to(tl.float64, bitcast=True)  # 0.6 in float64, exactly
    z = tl.zeros([1], tl.int32)
    if TOKEN:
        cnt = tl.zeros([BLOCK], tl.int32)
        for i0 in range(0, R, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            cnt += (tl.load(ratio_ptr + i, mask=i < R, other=float("inf")) < float("inf")).to(tl.int32)
        n = tl.sum(cnt, axis=0) + z
        v = (n - 1).to(tl.float64) * q06
        lo = tl.maximum(tl.floor(v), 0.0)
        hi = tl.minimum(lo + 1.0, tl.maximum(n - 1, 0).to(tl.float64))
        g = v - lo
        a = tl.load(ratio_ptr + lo.to(tl.int64))
        b = tl.load(ratio_ptr + hi.to(tl.int64))
        d = b - a
        ratio = tl.where(g >= 0.5, b - d * (1.0 - g), a + d * g)
        ratio = tl.where(n > 0, ratio, 1.0)
    else:
        c = tl.arange(0, CPAD)
        cm = c < C
        xmax = tl.full([CPAD], float("-inf"), tl.float32)
        xmin = tl.full([CPAD], float("inf"), tl.float32)
        rmax = tl.full([CPAD], float("-inf"), tl.float32)
        rmin = tl.full([CPAD], float("inf"), tl.float32)
        for k in range(0, nrb):
            at = k * C + c
            xmax = tl.maximum(xmax, tl.load(part_ptr + at, mask=cm, other=float("-inf")))
            xmin = tl.minimum(xmin, tl.load(part_ptr + nrb * C + at, mask=cm, other=float("inf")))
            rmax = tl.maximum(rmax, tl.load(part_ptr + 2 * nrb * C + at, mask=cm, other=float("-inf")))
            rmin = tl.minimum(rmin, tl.load(part_ptr + 3 * nrb * C + at, mask=cm, other=float("inf")))
        sx = (tl.max(tl.where(cm, xmax - xmin, 0.0), axis=0) + tl.zeros([1], tl.float32)).to(tl.float64)
        sr = (tl.max(tl.where(cm, rmax - rmin, 0.0), axis=0) + tl.zeros([1], tl.float32)).to(tl.float64)
        ratio = tl.where(sx > 0, sr / tl.where(sx > 0, sx, 1.0), 1.0)
    ratio = tl.where(ratio == ratio, ratio, 1.0)  # NaN: only from input the encoder rejects at its end
    bm1 = (base - 1).to(tl.float64) * tl.minimum(ratio, 1e6)
    if (base - 1) % 2 == 0:
        out = tl.minimum(2.0 * tl.maximum(_rint(bm1 * 0.5), 1.0), 254.0) + 1.0
    else:
        out = tl.minimum(tl.maximum(_rint(bm1), 1.0), 255.0) + 1.0
    use = out < base
    tl.store(lv_ptr + z, out.to(tl.float32), mask=use)
    tl.store(used_ptr + z, use.to(used_ptr.dtype.element_ty))


def residual_choice(x: torch.Tensor, pred: torch.Tensor, base: int, mode: int, resid: torch.Tensor,
                    lv: torch.Tensor, used: torch.Tensor, interpret: bool = False) -> None:
    """The writer's choice for one (K/V, layer) with no host read: resid = x - pred (fp32 [R, C] each);
    predict.residual_levels's count written into lv (fp32 [1], holding base) when below base, with
    used ([1], bool or uint8) set to whether it is; two launches (plus a sort in the token modes)."""
    R, C = x.shape
    token = mode in (quant.MODE_TOKEN, quant.MODE_TOKEN_SYMMETRIC)
    dev = x.device
    cpad = triton.next_power_of_2(C)
    if token:
        block_r = max(1, min(triton.next_power_of_2(R), (65536 if interpret else 4096) // cpad))
        block_c = cpad
    else:
        block_c = min(cpad, 256 if interpret else 64)
        block_r = min(triton.next_power_of_2(R), 256 if interpret else 64)
    nrb = triton.cdiv(R, block_r)
    ratio = torch.empty(max(R, 1) if token else 1, dtype=torch.float64, device=dev)
    part = torch.empty(4 * nrb * C if not token else 1, dtype=torch.float32, device=dev)
    _residual_spans_kernel[(nrb, triton.cdiv(C, block_c))](x, pred, resid, ratio, part, R, C, TOKEN=token,
                                                          SYM=mode == quant.MODE_TOKEN_SYMMETRIC, BLOCK_R=block_r,
                                                          BLOCK_C=block_c, **_opts(interpret, 4))
    if token:
        ratio = torch.sort(ratio[:R]).values
    _residual_choice_kernel[(1,)](ratio, part, lv, used.view(torch.uint8) if used.dtype == torch.bool else used,
                                  R, C, nrb, base, TOKEN=token, BLOCK=min(triton.next_power_of_2(max(R, 1)), 1024),
                                  CPAD=cpad, **_opts(interpret, 4))


@triton.jit
def _finish_layer_kernel(y_ptr, p_ptr, use_ptr, keep_ptr, rest_ptr, top_ptr, R, C, PRED: tl.constexpr,
                         KEEP: tl.constexpr, TOP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A dequantized layer y [R, C] made what the decoder will have, in place: + the prediction p where
    use_ptr[0] says the layer was coded as its residual (PRED), the protected rows put back (KEEP: keep
    [R], their values rest [R, C]); the largest |y| as fp32 bits, atomic max into top_ptr[0] (TOP)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < R
    m = rm[:, None] & (cols < C)[None, :]
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    y = tl.load(y_ptr + off, mask=m, other=0.0)
    if PRED:
        use = tl.load(use_ptr + tl.zeros([BLOCK_R], tl.int32)) != 0
        y = tl.where(use[:, None], y + tl.load(p_ptr + off, mask=m, other=0.0), y)
    if KEEP:
        keep = tl.load(keep_ptr + rows, mask=rm, other=0) != 0
        y = tl.where(keep[:, None], tl.load(rest_ptr + off, mask=m & keep[:, None], other=0.0), y)
    tl.store(y_ptr + off, y, mask=m)
    if TOP:
        a = tl.where(m, tl.abs(y).to(tl.int32, bitcast=True), 0)
        tl.atomic_max(top_ptr, tl.max(tl.max(a, axis=1), axis=0))


def finish_layer(y: torch.Tensor, pred: torch.Tensor | None, use: torch.Tensor | None, keep: torch.Tensor | None,
                 rest: torch.Tensor | None, top: torch.Tensor | None, interpret: bool = False) -> None:
    """_finish_layer_kernel on y fp32 [R, C] (contiguous): pred fp32 [R, C] with use ([1] bool/uint8), keep
    ([R] bool/uint8) with rest fp32 [R, C], top int32 [1]; each None: that step skipped. One launch."""
    R, C = y.shape
    if R == 0:
        return
    u8 = (lambda t: t.view(torch.uint8) if t is not None and t.dtype == torch.bool else t)
    block_r, block_c = (min(triton.next_power_of_2(R), 64), triton.next_power_of_2(C)) if interpret else (16, 64)
    _finish_layer_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        y, pred if pred is not None else y, u8(use) if use is not None else y, u8(keep) if keep is not None else y,
        rest if rest is not None else y, top if top is not None else y, R, C, PRED=pred is not None,
        KEEP=keep is not None, TOP=top is not None, BLOCK_R=block_r, BLOCK_C=block_c, **_opts(interpret, 4))
