"""Query-aware key rounding (FORMAT.md section 3) in torch: the reference the compiled coder
(csrc/quantize.c) and the Triton kernel (triton_quant.round_keys) are checked against."""
from __future__ import annotations

import torch

from kvmesh.codecs.cachegen import quant
from kvmesh.codecs.cachegen.rounding import QueryProfile, check_mode, device_factors


def round_keys(x: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, step: torch.Tensor, bm1: torch.Tensor,
               profile: QueryProfile) -> torch.Tensor:
    """Symbols of x fp32 [L, G, S, C] (a channel mode's view: G segments of S tokens) on the grid
    lo + q * step, q = 0..bm1, chosen by error feedback along the profile (module docstring).

    lo, inv, step broadcast against [L, G, 1, C]; bm1 against [L, 1, 1, 1]. Returns q uint8 [L, G, S, C].
    Per head and token, in the profile's order c = 0..D-1:
        t = x_c - lo_c;  t = t * inv_c;  t = t + 0.5;  q_c = min(max(floor(t), 0), bm1)
        y = q_c * step_c;  y = y + lo_c;  e = x_c - y;  e = e * R[c]
        x_j = x_j - e * F[c, j]   for j > c   (F: profile.factor, the product rounded first)
    """
    L, G, S, C = x.shape
    profile.check(L, C)
    H, D = profile.kv_heads, profile.head_dim
    cols, factor, recip = device_factors(profile, x.device)

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # [L, G, 1, C] -> reordered [L, G, 1, H, D]
        t = t.expand(L, G, 1, C)
        return torch.gather(t, 3, cols[:, None, None, :].expand(L, G, 1, C)).reshape(L, G, 1, H, D)

    xp = torch.gather(x, 3, cols[:, None, None, :].expand(L, G, S, C)).reshape(L, G, S, H, D)
    lop, invp, stepp = per_channel(lo), per_channel(inv), per_channel(step)
    top = bm1.reshape(L, 1, 1, 1)
    f = factor[:, None, None]  # [L, 1, 1, H, D, D]
    r = recip[:, None, None]  # [L, 1, 1, H, D]
    q = torch.empty_like(xp)
    for c in range(D):
        xc = xp[..., c]
        t = xc - lop[..., c]
        t = t * invp[..., c]
        t = t + 0.5
        t = torch.minimum(torch.clamp_min(torch.floor(t), 0.0), top)
        q[..., c] = t
        if c + 1 == D:
            break
        y = t * stepp[..., c]
        y = y + lop[..., c]
        e = xc - y
        e = e * r[..., c]
        upd = e[..., None] * f[..., c, c + 1:]
        xp[..., c + 1:] = xp[..., c + 1:] - upd
    out = torch.empty((L, G, S, C), dtype=torch.uint8, device=x.device)
    out.scatter_(3, cols[:, None, None, :].expand(L, G, S, C), q.reshape(L, G, S, C).to(torch.uint8))
    return out


def quantize_keys(x: torch.Tensor, side: list[torch.Tensor], levels: torch.Tensor, mode: int, profile: QueryProfile
                  ) -> torch.Tensor:
    """Symbols of keys x fp32 [L, T, C] on the grid of their side tensors (quant.quantize's), rounded
    along the profile: q uint8 [L, T, C]."""
    check_mode(mode)
    L, T, C = x.shape
    profile.check(L, C)
    lo, inv, step, bm1 = quant.grid(side, levels, mode)
    q = round_keys(quant._channel_view(x), lo, inv, step, bm1, profile)
    return q.reshape(L, -1, C)[:, :T]
