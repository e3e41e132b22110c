"""The cachegen levels: quantization modes and per-layer level counts, by name.

Level counts are given for a 30-layer reference depth (SmolLM2-135M) and mapped proportionally to
other depths: layer l of L uses entry floor(l * 30 / L). The container stores the resolved counts,
so a decoder never needs this file's values (they can be retuned without breaking old containers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvmesh.codecs.cachegen.quant import MODE_CHANNEL, MODE_TOKEN_SYMMETRIC

REFERENCE_LAYERS = 30


@dataclass(frozen=True)
class Level:
    name: str
    level_id: int  # the container's level byte
    key_mode: int
    value_mode: int
    key_levels: tuple[int, ...]  # REFERENCE_LAYERS entries
    value_levels: tuple[int, ...]

    def levels_for(self, layers: int) -> np.ndarray:
        """int [2, layers]: quantization levels per (K/V, layer)."""
        idx = (np.arange(layers) * REFERENCE_LAYERS) // layers
        return np.stack([np.asarray(self.key_levels)[idx], np.asarray(self.value_levels)[idx]]).astype(np.int64)


def _schedule(early: int, n_early: int, late: int) -> tuple[int, ...]:
    return (early,) * n_early + (late,) * (REFERENCE_LAYERS - n_early)


LEVELS: dict[str, Level] = {
    "default": Level("default", 0, MODE_CHANNEL, MODE_TOKEN_SYMMETRIC,
                     key_levels=_schedule(32, 10, 16), value_levels=_schedule(33, 2, 17)),
    "hq": Level("hq", 1, MODE_CHANNEL, MODE_TOKEN_SYMMETRIC,
                key_levels=_schedule(128, 10, 64), value_levels=_schedule(129, 2, 65)),
}
LEVEL_ALIASES = {"high": "hq"}
