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
# Modes (per K/V, stored in the container):
MODE_CHANNEL = 0  # asymmetric, one (lo, hi) per (layer, channel, segment of SEGMENT tokens)
MODE_TOKEN = 1  # asymmetric, one (lo, hi) per (layer, token), over the channels
MODE_TOKEN_SYMMETRIC = 2  # symmetric, one a per (layer, token): lo = -a, hi = a
MODES = (MODE_CHANNEL, MODE_TOKEN, MODE_TOKEN_SYMMETRIC)
SEGMENT = 256


def num_segments(tokens: int) -> int:
    return -(-tokens // SEGMENT)


def side_shape(mode: int, layers: int, tokens: int, channels: int) -> tuple[int, ...]:
    """Shape of one tensor's fp16 side information in a mode."""
    if mode == MODE_CHANNEL:
        return (2, layers, num_segments(tokens), channels)
    if mode == MODE_TOKEN:
        return (2, layers, tokens)
    return (1, layers, tokens)


def _bounds_for_elements(side: torch.Tensor, mode: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expands side information to (lo, hi) fp16 tensors that broadcast against [L, T, C]."""
    if mode == MODE_CHANNEL:
        lo, hi = side[0], side[1]  # [L, nseg, C]
        L, nseg, C = lo.shape
        lo = lo[:, :, None, :].expand(L, nseg, SEGMENT, C).reshape(L, nseg * SEGMENT, C)[:, :tokens]
        hi = hi[:, :, None, :].expand(L, nseg, SEGMENT, C).reshape(L, nseg * SEGMENT, C)[:, :tokens]
        return lo, hi
    if mode == MODE_TOKEN:
        return side[0][:, :, None], side[1][:, :, None]
    a = side[0][:, :, None]
    return -a, a


def quantize(x: torch.Tensor, levels: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes one of K or V.

    x fp32 [L, T, C] with |x| <= 65504; levels fp32 [L] (2..256 per layer); mode in MODES.
    Returns (q uint8 [L, T, C], side fp16 of side_shape(mode, L, T, C)).
    """
    L, T, C = x.shape
    if mode == MODE_CHANNEL:
        nseg = num_segments(T)
        pad = nseg * SEGMENT - T
        # padding repeats the last token, which leaves every segment's min and max unchanged
        xp = torch.cat([x, x[:, -1:, :].expand(L, pad, C)], dim=1) if pad else x
        xs = xp.reshape(L, nseg, SEGMENT, C)
        lo = fp16_round_down(torch.amin(xs, dim=2))
        hi = fp16_round_up(torch.amax(xs, dim=2))
        side = torch.stack([lo, hi])
    elif mode == MODE_TOKEN:
        side = torch.stack([fp16_round_down(torch.amin(x, dim=2)), fp16_round_up(torch.amax(x, dim=2))])
    elif mode == MODE_TOKEN_SYMMETRIC:
        side = fp16_round_up(torch.amax(torch.abs(x), dim=2))[None]
    else:
        raise ValueError(f"unknown quantization mode {mode}")
    lo, hi = _bounds_for_elements(side, mode, T)
    q = quantize_uniform(x, lo, hi, levels[:, None, None])
    return q, side


def dequantize(q: torch.Tensor, side: torch.Tensor, levels: torch.Tensor, mode: int) -> torch.Tensor:
    """Inverse of quantize: q uint8 [L, T, C], side fp16, levels fp32 [L] -> fp32 [L, T, C]."""
    lo, hi = _bounds_for_elements(side, mode, q.shape[1])
    return dequantize_uniform(q, lo, hi, levels[:, None, None])
