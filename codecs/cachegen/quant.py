"""Frozen quantization arithmetic shared by the CPU path and the Triton kernels (see FORMAT.md).

Every function here is a pure tensor function built only from order-independent exact operations:
amin/amax reductions, single IEEE fp32 + - * / ops (one torch op each, nothing fusable), rounding as
floor(t + 0.5), and integer ops. That is what lets a GPU kernel reproduce the bytes exactly.
"""
from __future__ import annotations

import torch

FP16_MAX = 65504.0


def fp16_round_down(v: torch.Tensor) -> torch.Tensor:
    """The largest fp16 value <= v (v fp32, |v| <= 65504), as float16."""
    h = v.to(torch.float16)
    too_big = h.to(torch.float32) > v
    b = h.view(torch.int16)
    down = torch.where(h > 0, b - 1, torch.where(h < 0, b + 1, torch.full_like(b, -32767)))  # -32767 = 0x8001
    return torch.where(too_big, down, b).view(torch.float16)


def fp16_round_up(v: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= v (v fp32, |v| <= 65504), as float16."""
    return -fp16_round_down(-v)


def group_bounds(x: torch.Tensor, dim: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) as fp16 with lo <= min(x) and hi >= max(x) over dim (kept), so clamping never bites."""
    lo = fp16_round_down(torch.amin(x, dim=dim, keepdim=True))
    hi = fp16_round_up(torch.amax(x, dim=dim, keepdim=True))
    return lo, hi


def quantize_uniform(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """q = clamp(floor((x - lo) * ((levels - 1) / (hi - lo)) + 0.5), 0, levels - 1) as uint8.

    x fp32; lo, hi fp16 (broadcast against x); levels fp32 (broadcast), 2 <= levels <= 256.
    A group with hi == lo quantizes to 0.
    """
    lo32 = lo.to(torch.float32)
    d = hi.to(torch.float32) - lo32
    flat = d > 0
    inv = (levels - 1.0) / torch.where(flat, d, torch.ones_like(d))
    inv = torch.where(flat, inv, torch.zeros_like(inv))
    t = x - lo32
    t = t * inv
    t = t + 0.5
    q = torch.floor(t)
    q = torch.minimum(torch.clamp_min(q, 0.0), levels - 1.0)
    return q.to(torch.uint8)


def dequantize_uniform(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """x = lo + q * ((hi - lo) / (levels - 1)) in fp32 (separate ops: product, then sum)."""
    lo32 = lo.to(torch.float32)
    step = (hi.to(torch.float32) - lo32) / (levels - 1.0)
    y = q.to(torch.float32) * step
    return y + lo32


# --- the cachegen quantization stage -------------------------------------------------------------
# Every mode reduces to: per group a lower bound lo (fp16) and a span d (fp32) with
#   inv = (B - 1) / d  (0 when d == 0),  q = clamp(floor((x - lo) * inv + 0.5), 0, B - 1)
#   step = d / (B - 1),                 x' = q * step + lo
# Modes (per K/V, stored in the container):
MODE_CHANNEL = 0  # per (layer, channel, segment): lo = min, d = max - min
MODE_TOKEN = 1  # per (layer, token) over channels: lo = min, d = max - min
MODE_TOKEN_SYMMETRIC = 2  # per (layer, token): a = max |x|, lo = -a, d = a - (-a)
MODE_CHANNEL_SHARED_STEP = 3  # lo per (layer, channel, segment), d = the largest max - min over the
#                               channels of the (layer, segment): one step size per layer and segment
MODES = (MODE_CHANNEL, MODE_TOKEN, MODE_TOKEN_SYMMETRIC, MODE_CHANNEL_SHARED_STEP)
SEGMENT = 256


def num_segments(tokens: int) -> int:
    return -(-tokens // SEGMENT)


def side_spec(mode: int, layers: int, tokens: int, channels: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The side tensors a mode stores, in order, as (shape, dtype)."""
    nseg = num_segments(tokens)
    if mode == MODE_CHANNEL:
        return [((2, layers, nseg, channels), torch.float16)]
    if mode == MODE_TOKEN:
        return [((2, layers, tokens), torch.float16)]
    if mode == MODE_TOKEN_SYMMETRIC:
        return [((layers, tokens), torch.float16)]
    if mode == MODE_CHANNEL_SHARED_STEP:
        return [((layers, nseg, channels), torch.float16), ((layers, nseg), torch.float32)]
    raise ValueError(f"unknown quantization mode {mode}")


def _channel_view(x: torch.Tensor) -> torch.Tensor:
    """[L, T, C] -> [L, nseg, SEGMENT, C], padding by repeating the last token (which leaves every
    segment's min and max unchanged); a single segment is the view [L, 1, T, C] (no copy)."""
    L, T, C = x.shape
    nseg = num_segments(T)
    if nseg == 1:
        return x.reshape(L, 1, T, C)
    pad = nseg * SEGMENT - T
    if pad:
        x = torch.cat([x, x[:, -1:, :].expand(L, pad, C)], dim=1)
    return x.reshape(L, nseg, SEGMENT, C)


def _groups(side: list[torch.Tensor], mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo fp32, d fp32) shaped to broadcast against the mode's view of x."""
    if mode == MODE_CHANNEL:
        lo = side[0][0].to(torch.float32)[:, :, None, :]
        return lo, side[0][1].to(torch.float32)[:, :, None, :] - lo
    if mode == MODE_TOKEN:
        lo = side[0][0].to(torch.float32)[:, :, None]
        return lo, side[0][1].to(torch.float32)[:, :, None] - lo
    if mode == MODE_TOKEN_SYMMETRIC:
        a = side[0].to(torch.float32)[:, :, None]
        return -a, a - (-a)
    return side[0].to(torch.float32)[:, :, None, :], side[1][:, :, None, None]


def quantize_params(x: torch.Tensor, levels: torch.Tensor, mode: int
                    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-group part of quantize: (side tensors, lo fp32, inv fp32, Bm1 fp32), lo and inv shaped
    to broadcast against the mode's view of x ([L, nseg, SEGMENT, C] for channel modes, else x), Bm1
    against it too. quantize finishes elementwise; CpuBackend may do that step in compiled code."""
    channel_mode = mode in (MODE_CHANNEL, MODE_CHANNEL_SHARED_STEP)
    if channel_mode:
        xv = _channel_view(x)
        lo16 = fp16_round_down(torch.amin(xv, dim=2))
        hi16 = fp16_round_up(torch.amax(xv, dim=2))
        if mode == MODE_CHANNEL:
            side = [torch.stack([lo16, hi16])]
        else:
            d = hi16.to(torch.float32) - lo16.to(torch.float32)
            side = [lo16, torch.amax(d, dim=2)]
    elif mode == MODE_TOKEN:
        side = [torch.stack([fp16_round_down(torch.amin(x, dim=2)), fp16_round_up(torch.amax(x, dim=2))])]
    elif mode == MODE_TOKEN_SYMMETRIC:
        side = [fp16_round_up(torch.amax(torch.abs(x), dim=2))]
    else:
        raise ValueError(f"unknown quantization mode {mode}")
    lo, inv, _, bm1 = grid(side, levels, mode)
    return side, lo, inv, bm1


def grid(side: list[torch.Tensor], levels: torch.Tensor, mode: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, inv, step, Bm1) fp32 of the groups the side tensors describe, shaped to broadcast against
    the mode's view of x: quantize uses lo and inv, dequantize lo and step."""
    lo, d = _groups(side, mode)
    bm1 = (levels - 1.0).reshape((levels.shape[0],) + (1,) * (d.dim() - 1))
    flat = d > 0
    inv = bm1 / torch.where(flat, d, torch.ones_like(d))
    inv = torch.where(flat, inv, torch.zeros_like(inv))
    return lo, inv, d / bm1, bm1


def quantize(x: torch.Tensor, levels: torch.Tensor, mode: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Quantizes one of K or V.

    x fp32 [L, T, C] with |x| <= 65504; levels fp32 [L] (2..256 per layer); mode in MODES.
    Returns (q uint8 [L, T, C], side tensors as side_spec(mode, L, T, C)).
    """
    L, T, C = x.shape
    channel_mode = mode in (MODE_CHANNEL, MODE_CHANNEL_SHARED_STEP)
    side, lo, inv, bm1 = quantize_params(x, levels, mode)
    xv = _channel_view(x) if channel_mode else x
    t = xv - lo
    t = t * inv
    t = t + 0.5
    t = torch.floor(t)
    t = torch.minimum(torch.clamp_min(t, 0.0), bm1)
    q = t.to(torch.uint8)
    if channel_mode:
        q = q.reshape(L, -1, C)[:, :T]
    return q, side


def dequantize_params(side: list[torch.Tensor], levels: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo fp32, step fp32) per group, shaped to broadcast against the mode's view of x (see quantize_params)."""
    lo, _, step, _ = grid(side, levels, mode)
    return lo, step


def dequantize(q: torch.Tensor, side: list[torch.Tensor], levels: torch.Tensor, mode: int) -> torch.Tensor:
    """Inverse of quantize: q uint8 [L, T, C], side tensors, levels fp32 [L] -> fp32 [L, T, C]."""
    L, T, C = q.shape
    channel_mode = mode in (MODE_CHANNEL, MODE_CHANNEL_SHARED_STEP)
    lo, step = dequantize_params(side, levels, mode)
    qv = q.to(torch.float32)
    if channel_mode:
        qv = _channel_view(qv)
    y = qv * step
    y = y + lo
    if channel_mode:
        y = y.reshape(L, -1, C)[:, :T]
    return y
