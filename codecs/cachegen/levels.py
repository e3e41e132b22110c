"""The cachegen levels: quantization modes and per-layer level counts, by name.

Level counts are given for a 30-layer reference depth (SmolLM2-135M) and mapped proportionally to
other depths: layer l of L uses entry floor(l * 30 / L). The container stores the resolved counts,
so a decoder never needs this file's values (they can be retuned without breaking old containers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvmesh.codecs.cachegen.quant import MODE_CHANNEL_SHARED_STEP, MODE_TOKEN_SYMMETRIC

REFERENCE_LAYERS = 30


@dataclass(frozen=True)
class Level:
    name: str
    level_id: int  # the container's level byte
    key_mode: int
    value_mode: int
    key_levels: tuple[int, ...]  # REFERENCE_LAYERS entries
    value_levels: tuple[int, ...]
    lead_tokens: int = 1  # tokens at the start of a chunk stored apart at 8 bits (the attention sink)

    def levels_for(self, layers: int) -> np.ndarray:
        """int [2, layers]: quantization levels per (K/V, layer)."""
        idx = (np.arange(layers) * REFERENCE_LAYERS) // layers
        return np.stack([np.asarray(self.key_levels)[idx], np.asarray(self.value_levels)[idx]]).astype(np.int64)


def _schedule(early: int, n_early: int, late: int) -> tuple[int, ...]:
    return (early,) * n_early + (late,) * (REFERENCE_LAYERS - n_early)


LEVELS: dict[str, Level] = {
    "default": Level("default", 0, MODE_CHANNEL_SHARED_STEP, MODE_TOKEN_SYMMETRIC,
                     key_levels=_schedule(16, 30, 16), value_levels=_schedule(9, 30, 9)),
    "hq": Level("hq", 1, MODE_CHANNEL_SHARED_STEP, MODE_TOKEN_SYMMETRIC,
                key_levels=_schedule(64, 30, 64), value_levels=_schedule(33, 30, 33)),
}
LEVEL_ALIASES = {"high": "hq"}
