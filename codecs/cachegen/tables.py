"""Probability models for the rANS streams, derived from committed constants with integer math only.

A stream's residual symbols live in an alphabet of B symbols (B = the quantization levels of its
layer). For every B the family of NT tables is built from model_weights.npy (see gen_tables.py) by
integer arithmetic, so every machine (CPU node, GPU node) derives identical tables, and a stream
names its table with one byte.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvmesh.codecs.cachegen import rans

_HERE = Path(__file__).parent
MODEL_WEIGHTS = np.load(_HERE / "model_weights.npy", allow_pickle=False).astype(np.int64)
LOG2_COST = np.load(_HERE / "log2_cost.npy", allow_pickle=False).astype(np.int64)
NUM_TABLES = MODEL_WEIGHTS.shape[0]
TABLE_FAMILY_VERSION = 1


@dataclass(frozen=True)
class AlphabetTables:
    levels: int
    freq: np.ndarray  # int32 [NT, B]
    cum: np.ndarray  # int32 [NT, B + 1]
    slot_to_symbol: np.ndarray  # uint8 [NT, 4096]
    cost: np.ndarray  # int64 [NT, B]: integer bit cost, 1/256 bit units


def residual_magnitude(levels: int) -> np.ndarray:
    """|r| of each residual symbol s in [0, B): s for s <= B/2, else B - s (modular residual)."""
    s = np.arange(levels)
    return np.minimum(s, levels - s)


def frequencies(levels: int) -> np.ndarray:
    """freq[t][s] = 1 + floor(w[t][s] * (4096 - B) / sum_s w[t][s]), leftover added to s = 0."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must lie in [2, 256], got {levels}")
    w = MODEL_WEIGHTS[:, residual_magnitude(levels)]
    total = w.sum(axis=1, keepdims=True)
    freq = 1 + (w * (rans.M - levels)) // total
    freq[:, 0] += rans.M - freq.sum(axis=1)
    return freq.astype(np.int32)


@functools.lru_cache(maxsize=None)
def alphabet_tables(levels: int) -> AlphabetTables:
    freq = frequencies(levels)
    cum, slot_to_symbol = rans.build_tables(freq)
    return AlphabetTables(levels, freq, cum, slot_to_symbol, LOG2_COST[freq])
