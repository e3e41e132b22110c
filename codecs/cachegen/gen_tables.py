"""Generates the constant model tables committed beside this script (run once; output is checked in).

    python codecs/cachegen/gen_tables.py

model_weights.npy  uint32 [NT, 129]: integer weights of NT symmetric discrete distributions over a
                   residual's magnitude |r| = 0..128, a generalized-Gaussian family
                   exp(-(|r|/w)^p) integrated over [|r|-1/2, |r|+1/2], for SHAPES x WIDTHS.
log2_cost.npy      int32 [4097]: round(256 * (12 - log2(f))) for f = 0..4096 (f = 0 is never used;
                   it gets 256 * 32) -- the integer bit cost used to pick a table per stream.

The coder never evaluates exp/log at run time: frequency tables for an alphabet of B symbols are
derived from model_weights with integer arithmetic only (tables.py), so every machine builds
identical tables.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = (0.6, 0.9, 1.3, 2.0)  # generalized-Gaussian exponents: heavy-tailed .. Gaussian
N_WIDTHS = 16
WIDTHS = np.geomspace(0.18, 90.0, N_WIDTHS)  # in quantization steps
WEIGHT_SCALE = 2**24
HERE = Path(__file__).parent


def weights() -> np.ndarray:
    r = np.arange(129, dtype=np.float64)
    sub = (np.arange(64) + 0.5) / 64 - 0.5  # midpoints of 64 sub-intervals of [-1/2, 1/2]
    out = []
    for p in SHAPES:
        for w in WIDTHS:
            x = np.abs(r[:, None] + sub[None, :])
            dens = np.exp(-((x / w) ** p)).mean(axis=1)
            dens = dens / dens[0]
            out.append(np.maximum(np.round(dens * WEIGHT_SCALE), 0))
    return np.asarray(out, dtype=np.uint32)


def log2_cost() -> np.ndarray:
    f = np.arange(4097, dtype=np.float64)
    with np.errstate(divide="ignore"):
        c = np.round(256 * (12 - np.log2(f)))
    c[0] = 256 * 32
    return c.astype(np.int32)


if __name__ == "__main__":
    np.save(HERE / "model_weights.npy", weights(), allow_pickle=False)
    np.save(HERE / "log2_cost.npy", log2_cost(), allow_pickle=False)
    print("wrote", HERE / "model_weights.npy", HERE / "log2_cost.npy")
