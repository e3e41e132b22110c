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
