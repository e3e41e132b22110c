"""Cross-layer prediction (FORMAT.md section 3) in torch, one feature at a time: the reference the
compiled coder (csrc/predict.c) and the Triton kernel (triton_quant.predict) are checked against."""
from __future__ import annotations

import torch


def predict_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The prediction's exact arithmetic in torch: x fp32 [R, F], w [F, C], b [C] -> [R, C]."""
    acc = b.expand(x.shape[0], -1).clone()
    for i in range(x.shape[1]):
        acc = acc + x[:, i:i + 1] * w[i]
    return acc
