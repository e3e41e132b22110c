"""Cross-layer prediction for cachegen: code each layer's KV as its difference from a linear
prediction made from the layers already decoded.

A layer's keys and values are projections of one hidden state, which changes little from layer to
layer, so the decoded KV of layer l-1 (and, for values, the decoded keys of layer l) predicts layer
l's KV well: on SmolLM2-135M the residual costs ~18% fewer bytes than the KV itself at the same step
(BENCHMARKS.md, "Cross-layer prediction"). The predictor belongs to a model, like a query profile; it
is fitted once from that model's KV (``python -m kvmesh.engine.predictor``) and the decoder needs the
same one: the container stores its 8-byte id.

For layer l >= 1 (FORMAT.md section 3, "Cross-layer prediction"), with K', V' the decoded fp32 rest
tokens [R, C]:
    keys:   P = [K'[l-1] | V'[l-1]]          @ Wk[l] + bk[l]     (features 2C)
    values: P = [K'[l-1] | V'[l-1] | K'[l]]  @ Wv[l] + bv[l]     (features 3C)
The residual x - P is quantized with the level's mode; the decoded value is dequant(q) + P.

Two arithmetics compute P, named per predicted layer by the container (section 8's flags):

* fixed-point (written since 2026-12-03): each decoded (K/V, layer) becomes int16 once, with a power-of-
  two scale from its largest magnitude (``to_fixed``); the fp32 weights become int16 at load time, with a
  power-of-two scale per (part, output column) small enough that no int32 sum can overflow
  (``LayerPredictor.fixed``); each part's dot products are exact integers, so any summation order (the
  CPU's int16 pair instructions, a GPU's tiles) gives the same sums, and only three fp32 operations per
  part and output remain. 2.5x cheaper on the CPU than the fp32 form at the same prediction quality.
* fp32 (containers written before): acc = b[j]; acc = acc + x[i] * w[i, j] for i = 0 .. F-1 (IEEE
  fp32, the product rounded, then the sum; nothing fused), the order fixed by the format.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvmesh.codecs.cachegen import npzfile
from kvmesh.codecs.errors import CodecError

_FORMAT = "kvmesh-layer-predictor-1"
ID_BYTES = 8
DEFAULT_RIDGE = 1e-4  # fraction of the mean feature energy added to the normal equations' diagonal
# token modes: the residual's level count follows this quantile of the per-token range ratios. The median
# (0.5) gives the tokens above it coarser steps than without prediction, and NLL noticed (+0.012 on
# botchan, 8.23x); 0.6: +0.009, 8.04x; 0.7: +0.003, 7.85x (BENCHMARKS.md "Cross-layer prediction")
TOKEN_RATIO_QUANTILE = 0.6

# Fixed-point prediction (FORMAT.md section 3, "Fixed-point prediction"): the format's constants.
X_MAX = 32767  # |int16 feature| <= X_MAX (symmetric: -32768 never occurs)
W_MAX = 32767  # |int16 weight| <= W_MAX
W_L1_MAX = 65535  # sum |weights| of one part's column: X_MAX * W_L1_MAX < 2^31, so int32 sums are exact
SX_MIN, SX_MAX = -16, 30  # feature scale exponents (2^sx), SX_MAX for an all-zero layer
SW_MIN, SW_MAX = -16, 40  # weight scale exponents: sx + sw in [-32, 70], so every 2^-(sx + sw) is a normal fp32
FLAG_FP32, FLAG_FIXED = 1, 2  # section 8's flag of a predicted (K/V, layer): which arithmetic


@dataclass(frozen=True, eq=False)
class LayerPredictor:
    """Per layer l >= 1 of a model: fp32 weights and biases of the key and value predictions."""

    key_weights: np.ndarray  # [L-1, 2C, C]
    key_bias: np.ndarray  # [L-1, C]
    value_weights: np.ndarray  # [L-1, 3C, C]
    value_bias: np.ndarray  # [L-1, C]
    ident: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        arrays = {}
        for name in ("key_weights", "key_bias", "value_weights", "value_bias"):
            a = np.ascontiguousarray(getattr(self, name), dtype=np.float32)
            if not np.isfinite(a).all():
                raise CodecError(f"layer predictor {name} must be finite")
            arrays[name] = a
            object.__setattr__(self, name, a)
        kw, kb, vw, vb = (arrays[n] for n in ("key_weights", "key_bias", "value_weights", "value_bias"))
        if kw.ndim != 3 or kw.shape[0] < 1 or kw.shape[1] != 2 * kw.shape[2]:
            raise CodecError(f"layer predictor key weights must be [layers - 1, 2C, C], got {kw.shape}")
        n, C = kw.shape[0], kw.shape[2]
        if kb.shape != (n, C) or vw.shape != (n, 3 * C, C) or vb.shape != (n, C):
            raise CodecError(f"layer predictor arrays disagree: key weights {kw.shape}, key bias {kb.shape}, "
                             f"value weights {vw.shape}, value bias {vb.shape}")
        h = hashlib.sha256(_FORMAT.encode())
        for a in (kw, kb, vw, vb):
            h.update(repr(a.shape).encode())
            h.update(a.astype("<f4").tobytes())
        object.__setattr__(self, "ident", h.digest()[:ID_BYTES])

    @property
    def layers(self) -> int:
        return self.key_weights.shape[0] + 1

    @property
    def channels(self) -> int:
        return self.key_weights.shape[2]

    def check(self, layers: int, channels: int) -> None:
        if (layers, channels) != (self.layers, self.channels):
            raise CodecError(f"the layer predictor is for {self.layers} layers x {self.channels} channels; "
                             f"this KV has {layers} layers x {channels} channels")

    def weights(self, kv: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        if not 1 <= layer < self.layers:
            raise ValueError(f"layer {layer} has no prediction")
        if kv == 0:
            return self.key_weights[layer - 1], self.key_bias[layer - 1]
        return self.value_weights[layer - 1], self.value_bias[layer - 1]

    def device_weights(self, kv: int, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (kv, layer, str(device))
        if key not in cache:
            w, b = self.weights(kv, layer)
            cache[key] = (torch.from_numpy(w).to(device), torch.from_numpy(b).to(device))
        return cache[key]

    def fixed(self, kv: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The fixed-point weights of (kv, layer >= 1): (W int16 [F, C], sw int32 [P, C]) with P = F / C
        parts (features of one decoded layer each), made once from the fp32 weights and cached. Per part
        p and column j, sw[p, j] is the largest integer in [SW_MIN, SW_MAX] for which the part's
        W = floor(w * 2^sw + 0.5) (float64, exact) has every |W| <= W_MAX and sum |W| <= W_L1_MAX
        (FORMAT.md section 3): the finest weights whose int32 dot product with any int16 features
        cannot overflow."""
        cache = self.__dict__.setdefault("_fixed_cache", {})
        if (kv, layer) not in cache:
            w, _ = self.weights(kv, layer)
            cache[kv, layer] = fixed_weights(w, self.channels)
        return cache[kv, layer]

    # -- files: a numpy .npz without pickles ------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        return npzfile.save(path, _FORMAT, key_weights=self.key_weights, key_bias=self.key_bias,
                            value_weights=self.value_weights, value_bias=self.value_bias)

    @classmethod
    def load(cls, path: str | Path) -> LayerPredictor:
        return npzfile.load(path, _FORMAT, "layer predictor",
                            lambda z: cls(z["key_weights"], z["key_bias"], z["value_weights"], z["value_bias"]))


def features(dec: torch.Tensor, kv: int, layer: int) -> torch.Tensor:
    """The prediction's input for (kv, layer >= 1) from decoded fp32 dec [2, L, R, C]: [R, 2C] or [R, 3C]."""
    parts = [dec[0, layer - 1], dec[1, layer - 1]] + ([dec[0, layer]] if kv == 1 else [])
    return torch.cat(parts, dim=1).contiguous()


def fixed_weights(w: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """LayerPredictor.fixed's conversion of fp32 w [P * width, C]: (W int16 [P * width, C], sw int32 [P, C])."""
    F, C = w.shape
    parts = w.astype(np.float64).reshape(F // width, width, C)
    a = np.abs(parts)
    l1, top = a.sum(axis=1), a.max(axis=1)  # [P, C]: estimates only; the exact test is on the rounded W
    with np.errstate(divide="ignore"):
        est = np.floor(np.minimum(np.log2(W_L1_MAX / l1), np.log2(W_MAX / top)))
    sw = np.clip(np.nan_to_num(est, nan=SW_MAX, posinf=SW_MAX, neginf=SW_MIN) + 2, SW_MIN, SW_MAX).astype(np.int64)
    while True:  # the conditions only fail more as sw grows: step each failing column down to its largest
        q = np.floor(parts * np.ldexp(1.0, sw)[:, None, :] + 0.5)
        ok = (np.abs(q).max(axis=1) <= W_MAX) & (np.abs(q).sum(axis=1) <= W_L1_MAX)
        if ok.all():
            break
        if (sw[~ok] == SW_MIN).any():
            raise CodecError(f"layer predictor weights up to {float(a.max()):.3g} are too large for fixed-point "
                             f"prediction (at most {W_MAX * 2.0 ** -SW_MIN:.3g} a weight)")
        sw = np.where(ok, sw, sw - 1)
    return q.reshape(F, C).astype(np.int16), sw.astype(np.int32)


def fixed_exponent(top: float) -> int:
    """The scale exponent sx of a decoded layer whose largest magnitude is ``top`` (FORMAT.md section 3):
    15 - e for the smallest integer e with top < 2^e (so |y| 2^sx < 2^15), clamped to [SX_MIN, SX_MAX];
    SX_MAX for top = 0."""
    if top == 0:
        return SX_MAX
    return min(max(15 - math.frexp(top)[1], SX_MIN), SX_MAX)


def to_fixed(y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A decoded layer y fp32 [R, C] as fixed-point features on its own device: (X int16 [R, C], sx) with
    X = clamp(floor(y * 2^sx + 0.5), -X_MAX, X_MAX) in fp32 (the product exact: a power of two)."""
    sx = fixed_exponent(float(y.abs().amax()) if y.numel() else 0.0)
    v = torch.floor(y.to(torch.float32) * (2.0 ** sx) + 0.5)
    return v.clamp_(-X_MAX, X_MAX).to(torch.int16), sx


def part_scales(sx: Iterable[int], sw: torch.Tensor) -> torch.Tensor:
    """fp32 [P, C]: 2^-(sx[p] + sw[p, j]), built from its exponent bits (exact on every device)."""
    k = torch.as_tensor(list(sx), dtype=torch.int32, device=sw.device)[:, None] + sw.to(torch.int32)
    return ((127 - k) << 23).view(torch.float32)


def residual_levels(base: int, x: torch.Tensor, r: torch.Tensor, mode: int) -> int:
    """The level count a writer uses for a residual r of x (both fp32 [1, T, C]) so that r is quantized
    with about the step x would get at ``base`` levels: B - 1 scaled by how much smaller r's range is
    (channel modes: the largest channel range; token modes: the TOKEN_RATIO_QUANTILE quantile over
    tokens of the per-token range ratio), keeping its parity (an even B - 1 keeps a level at zero in the symmetric mode), at least
    1 (2 when even), at most 255. Computed from exact reductions in float64 on the host, so every
    device chooses the same count; the container stores it like any level count."""
    from kvmesh.codecs.cachegen import quant

    def spans(t: torch.Tensor) -> np.ndarray:
        if mode in (quant.MODE_CHANNEL, quant.MODE_CHANNEL_SHARED_STEP):
            return (t.amax(dim=1) - t.amin(dim=1)).amax().reshape(1).cpu().double().numpy()
        if mode == quant.MODE_TOKEN_SYMMETRIC:
            return t.abs().amax(dim=2).reshape(-1).cpu().double().numpy()
        return (t.amax(dim=2) - t.amin(dim=2)).reshape(-1).cpu().double().numpy()

    return levels_from_spans(base, spans(x), spans(r))


def quantile_linear(a: np.ndarray, q: float) -> float:
    """np.quantile(a, q) (its default "linear" method) for a float64 [n >= 1] without NaN, with the same
    float64 operations (virtual index (n - 1) q, then numpy's two-sided lerp), so the same value, at a
    tenth of np.quantile's cost: a chunk's encoder asks it ~30 times."""
    s = np.sort(a)
    v = (s.size - 1) * q
    lo = math.floor(v)
    hi = min(lo + 1, s.size - 1)
    g = v - lo
    x, y = float(s[lo]), float(s[hi])
    d = y - x
    return y - d * (1 - g) if g >= 0.5 else x + d * g


def levels_from_spans(base: int, sx: np.ndarray, sr: np.ndarray) -> int:
    """residual_levels from the spans it compares (float64 [n] each, n = 1 in channel modes): the
    CPU's fused encoder (native.layer_residual) computes them in its pass over the residual."""
    if sx.size == 1:  # channel modes: the quantile of one ratio is that ratio (the same float64 value)
        ratio = float(sr[0]) / float(sx[0]) if sx[0] > 0 else 1.0
    else:
        ok = sx > 0
        ratio = quantile_linear(sr[ok] / sx[ok], TOKEN_RATIO_QUANTILE) if ok.any() else 1.0
    bm1 = (base - 1) * min(ratio, 1e6)
    if (base - 1) % 2 == 0:
        out = 2 * max(1, int(np.rint(bm1 / 2)))
        return min(out, 254) + 1
    return min(max(1, int(np.rint(bm1))), 255) + 1


# -- fitting ---------------------------------------------------------------------------------------

def _solve(gram: np.ndarray, xty: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares from the normal equations of [x | 1] (the bias column last): (w fp32, b fp32)."""
    a = gram.copy()
    a[np.diag_indices_from(a)] += ridge * float(np.mean(np.diag(a)))
    sol = np.linalg.solve(a, xty)
    return sol[:-1].astype(np.float32), sol[-1].astype(np.float32)


def _fit_weights(exact: torch.Tensor, inputs: torch.Tensor, ridge: float) -> dict[str, np.ndarray]:
    """exact, inputs fp32 [2, L, N, C] (the rows of many chunks side by side). Per layer one float64
    Gram matrix of [K'[l-1] | V'[l-1] | K'[l] | 1] serves both fits: the key features are its first 2C
    columns (and the bias), so the keys' normal equations are a sub-block of the values'."""
    L, N, C = exact.shape[1], exact.shape[2], exact.shape[3]
    out: dict[str, list[np.ndarray]] = {"key_weights": [], "key_bias": [], "value_weights": [], "value_bias": []}
    ones = torch.ones(N, 1, dtype=torch.float64)
    key_cols = np.r_[0:2 * C, 3 * C]
    for layer in range(1, L):
        x = torch.cat([features(inputs, 1, layer).double(), ones], dim=1)  # [N, 3C + 1]
        gram = (x.T @ x).numpy()
        y = torch.stack([exact[0, layer], exact[1, layer]]).double()  # [2, N, C]
        xty = torch.einsum("nf,knc->kfc", x, y).numpy()  # [2, 3C + 1, C]
        w, b = _solve(gram[np.ix_(key_cols, key_cols)], xty[0][key_cols], ridge)
        out["key_weights"].append(w)
        out["key_bias"].append(b)
        w, b = _solve(gram, xty[1], ridge)
        out["value_weights"].append(w)
        out["value_bias"].append(b)
    return {k: np.stack(v) for k, v in out.items()}


def fit(chunks: Iterable[torch.Tensor], level: str = "default", ridge: float = DEFAULT_RIDGE,
        schedule: tuple[Sequence[int], Sequence[int]] | None = None) -> LayerPredictor:
    """Fits a predictor to a model's KV chunks ([2, L, T, C], T >= 2 each; typically 256-token chunks
    of a few thousand tokens of text). Two passes: a least-squares fit on the exact KV, then a refit on
    the KV as ``level`` decodes it with that first predictor, so the weights expect the noise they will
    see (``schedule``: the model's own level counts the codec will use, if any). The chunks' first token
    (stored apart by the codec) is left out."""
    from kvmesh.codecs.cachegen.codec import make_codec

    chunks = [c.detach().to(torch.float32).cpu() for c in chunks]
    if not chunks:
        raise ValueError("fitting a layer predictor needs at least one chunk")
    shapes = {tuple(c.shape[:2]) + (c.shape[3],) for c in chunks}
    if len(shapes) != 1 or any(c.dim() != 4 or c.shape[0] != 2 or c.shape[2] < 2 for c in chunks):
        raise ValueError("fitting needs chunks [2, L, T >= 2, C] of one model")
    exact = torch.cat([c[:, :, 1:] for c in chunks], dim=2)
    provisional = LayerPredictor(**_fit_weights(exact, exact, ridge))
    codec = make_codec(level, "cpu", predictor=provisional, schedule=schedule)
    decoded = torch.cat([codec.decode(codec.encode(c)).to(torch.float32)[:, :, 1:] for c in chunks], dim=2)
    return LayerPredictor(**_fit_weights(exact, decoded, ridge))
