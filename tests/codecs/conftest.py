"""Shared helpers for the codec tests."""
from __future__ import annotations

import torch

_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so exactness checks see -0.0 vs 0.0 and NaN payloads."""
    return t.contiguous().view(_INT[t.dtype])


def kv_like(layers: int = 3, tokens: int = 40, channels: int = 24, dtype: torch.dtype = torch.float16,
            seed: int = 0) -> torch.Tensor:
    """KV-shaped data with the features real caches have: key outlier channels with offsets,
    heavier-tailed values, and per-token magnitude changes."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, tokens, channels, generator=g)
    k = k * (1 + 4 * torch.rand(layers, 1, channels, generator=g)) + 3 * torch.randn(layers, 1, channels, generator=g)
    v = torch.distributions.Laplace(0.0, 1.0).sample((layers, tokens, channels)) * 0.5
    v = v * (0.5 + torch.rand(layers, tokens, 1, generator=g))
    return torch.stack([k, v]).to(dtype)
