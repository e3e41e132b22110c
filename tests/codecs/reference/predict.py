"""Cross-layer prediction (FORMAT.md section 3) in torch/numpy, one step at a time: the reference the
compiled coder (csrc/predict.c) and the Triton kernels (triton_quant.predict, predict_fixed) are
checked against."""
from __future__ import annotations

import math

import numpy as np
import torch

from kvmesh.codecs.cachegen.predict import SX_MAX, SX_MIN, X_MAX


def predict_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The fp32 prediction's exact arithmetic in torch: x fp32 [R, F], w [F, C], b [C] -> [R, C]."""
    acc = b.expand(x.shape[0], -1).clone()
    for i in range(x.shape[1]):
        acc = acc + x[:, i:i + 1] * w[i]
    return acc


def to_fixed_reference(y: np.ndarray) -> tuple[np.ndarray, int]:
    """FORMAT.md's fixed-point features of a decoded layer, in numpy: (X int16 [R, C], sx)."""
    y = np.asarray(y, np.float32)
    top = float(np.abs(y).max()) if y.size else 0.0
    sx = SX_MAX if top == 0 else min(max(15 - math.frexp(top)[1], SX_MIN), SX_MAX)
    v = np.floor(y * np.float32(2.0 ** sx) + np.float32(0.5))
    return np.clip(v, -X_MAX, X_MAX).astype(np.int16), sx


def predict_fixed_reference(parts: list[tuple[np.ndarray, int]], w: np.ndarray, sw: np.ndarray,
                            b: np.ndarray) -> np.ndarray:
    """FORMAT.md's fixed-point prediction in numpy: parts (X int16 [R, C], sx) in feature order, w int16
    [P * C, C] and sw int32 [P, C] (LayerPredictor.fixed), b fp32 [C] -> fp32 [R, C]. Each part's dot
    products exactly in int64 (they must fit int32), then P = P + float32(A) * 2^-(sx + sw) in part order."""
    R, C = parts[0][0].shape[0], w.shape[1]
    acc = np.broadcast_to(np.asarray(b, np.float32), (R, C)).copy()
    for p, (x, sx) in enumerate(parts):
        a = np.asarray(x)[:, :C].astype(np.int64) @ w[p * C:(p + 1) * C].astype(np.int64)
        assert np.abs(a).max(initial=0) < 2 ** 31, "the weights' scales must keep every sum in int32"
        scale = np.ldexp(np.float32(1.0), -(sx + sw[p].astype(np.int64))).astype(np.float32)
        acc = acc + a.astype(np.float32) * scale
    return acc
