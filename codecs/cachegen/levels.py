"""The cachegen levels: quantization modes and per-layer level counts, by name.

Level counts are given for a 30-layer reference depth (SmolLM2-135M) and mapped proportionally to
other depths: layer l of L uses entry floor(l * 30 / L). The container stores the resolved counts,
so a decoder never needs this file's values (they can be retuned without breaking old containers).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvmesh.codecs.cachegen.quant import MODE_CHANNEL_SHARED_STEP, MODE_TOKEN_SYMMETRIC
from kvmesh.codecs.errors import CodecError

REFERENCE_LAYERS = 30
# kvmesh's and LMCache's chunk length: a chunk with fewer tokens is the partial last chunk of a stored
# sequence (Level.tail_for)
SHORT_CHUNK = 256


@dataclass(frozen=True)
class Level:
    name: str
    level_id: int  # the container's level byte
    key_mode: int
    value_mode: int
    key_levels: tuple[int, ...]  # REFERENCE_LAYERS entries
    value_levels: tuple[int, ...]
    lead_tokens: int = 1  # tokens at the start of a chunk stored apart at 8 bits (the attention sink)
    # (K, V): a row (layer, token) whose mean |x| is below this fraction of the median of those means
    # over the chunk's tokens is stored again at 8 bits (codec.py, "protected rows"); 0 = never
    protect: tuple[float, float] = (0.0, 0.0)
    # (K, V): may a stream code the differences of consecutive symbols where that is cheaper
    # (delta.py; lossless)? Keys gain 3.7% of a chunk; values 0.07%, not worth a second statistics pass
    delta: tuple[bool, bool] = (True, False)
    # rows at the end of a chunk shorter than SHORT_CHUNK tokens (the last chunk of a stored prompt: the
    # tokens the next generated ones attend to most) stored again at 8 bits, K and V, every layer
    # (codec.py, "protected rows"); 0 = never
    tail_tokens: int = 0

    @property
    def protects(self) -> bool:
        return any(t > 0 for t in self.protect) or self.tail_tokens > 0

    def tail_for(self, tokens: int) -> int:
        """How many of a ``tokens``-token chunk's last rows to protect: ``tail_tokens`` when the chunk is
        shorter than SHORT_CHUNK (only the last chunk of a stored sequence is), else 0. Why: the first
        tokens generated after a prompt attend most to its last tokens; coded at the level's few steps
        they flipped the quick start's first generated token (BENCHMARKS.md, "Model files and quality")."""
        return self.tail_tokens if 0 < tokens < SHORT_CHUNK else 0

    def levels_for(self, layers: int) -> np.ndarray:
        """int [2, layers]: quantization levels per (K/V, layer). A schedule of n entries (REFERENCE_LAYERS
        for the named levels; a model's own schedule has its depth) gives layer l of L entry floor(l * n / L)."""
        idx = (np.arange(layers) * len(self.key_levels)) // layers
        return np.stack([np.asarray(self.key_levels)[idx], np.asarray(self.value_levels)[idx]]).astype(np.int64)


def _bands(*runs: tuple[int, int]) -> tuple[int, ...]:
    out: tuple[int, ...] = ()
    for n, b in runs:
        out += (b,) * n
    if len(out) != REFERENCE_LAYERS:
        raise ValueError("a level schedule must cover the reference depth")
    return out


# Tuned on Botchan KV of SmolLM2-135M (BENCHMARKS.md "Codecs"). Measured there:
# - keys: one step per (layer, segment) shared by all channels (mode 3) beat a per-channel range
#   (mode 0) at equal bits; values: per-token symmetric (mode 2) beat per-token asymmetric and
#   per-channel. Keys limit quality far more than values.
# - the layers that matter most are the middle ones (10-24 of 30), not the early ones LMCache favours.
# - protecting the sink-like value rows (mean |v| < 0.35 x the chunk's median) at 8 bits buys more
#   top-1 per byte than any level change: with it, values at 7 levels beat 9 without it
#   (bench/quant_lab.py; key rows gain less than the same bytes spent on key levels).
# - values at 5 levels in layers 25-29 cost -0.1 / +0.2 points of top-1 (botchan / held-out; quant_lab.py
#   value-layers): the default does that since the cross-layer prediction work (BENCHMARKS.md).
LEVELS: dict[str, Level] = {
    "default": Level("default", 0, MODE_CHANNEL_SHARED_STEP, MODE_TOKEN_SYMMETRIC,
                     key_levels=_bands((10, 20), (15, 28), (5, 14)),
                     value_levels=_bands((25, 7), (5, 5)), protect=(0.0, 0.35)),
    # hq protects the sink-like value rows too (since the coded-streams work). Its counts per layer
    # spend the bits where SmolLM2's output moves: each (K/V, layer)'s share of the continuation's KL,
    # measured at the former uniform K 64 / V 33 on the calibration text, spans 500x (K 10, 18, 23 and
    # V 0, 18 lead); bits follow 1/2 log2 of it, 15% more steps overall, no layer under half its former
    # steps (bench/layer_sensitivity.py --uniform 64,33 --damp 1 --scale 1.15 --floor 32,17). That
    # halves the KL at equal bits; top-1 over 16 windows went from 98.9 / 98.7% to 99.3 / 99.1% (botchan /
    # held-out, both model files; BENCHMARKS.md "Layer allocation"). Other depths sample the table (see above).
    "hq": Level("hq", 1, MODE_CHANNEL_SHARED_STEP, MODE_TOKEN_SYMMETRIC,
                key_levels=(32, 46, 59, 104, 71, 95, 85, 193, 160, 112, 256, 32, 51, 52, 104,
                            79, 47, 195, 256, 63, 176, 97, 73, 247, 128, 44, 75, 43, 70, 45),
                value_levels=(77, 29, 35, 17, 21, 21, 21, 39, 71, 25, 19, 19, 35, 23, 43,
                              47, 31, 71, 97, 29, 51, 41, 27, 79, 51, 21, 25, 19, 31, 23),
                protect=(0.0, 0.35)),
    # the default's keys; values at 5 levels in the layers where 5 instead of 7 moved top-1 by <= 0.2
    # points on both texts (10-14, 25-29; bench/quant_lab.py, BENCHMARKS.md "A compact level"):
    # ~2% fewer bytes than the default (which has 25-29 at 5 too)
    "compact": Level("compact", 2, MODE_CHANNEL_SHARED_STEP, MODE_TOKEN_SYMMETRIC,
                     key_levels=_bands((10, 20), (15, 28), (5, 14)),
                     value_levels=_bands((10, 7), (5, 5), (10, 7), (5, 5)), protect=(0.0, 0.35)),
}


SCHEDULE_FORMAT = "kvmesh-level-schedule-1"


MAX_TAIL_TOKENS = 255  # a partial chunk has at most 255 tokens


def with_schedule(level: Level, key_levels: Sequence[int], value_levels: Sequence[int],
                  tail_tokens: int | None = None) -> Level:
    """``level`` with a model's own per-layer level counts (its modes, protection and lead unchanged) and,
    when given, its own ``tail_tokens`` (Level.tail_for). Writers only: the container stores the counts and
    the protected rows, so any decoder reads the result."""
    k, v = tuple(int(b) for b in key_levels), tuple(int(b) for b in value_levels)
    if not k or len(k) != len(v):
        raise CodecError(f"a level schedule needs as many key as value counts (>= 1), got {len(k)} and {len(v)}")
    if min(k + v) < 2 or max(k + v) > 256:
        raise CodecError("level counts must lie in [2, 256]")
    if tail_tokens is None:
        return dataclasses.replace(level, key_levels=k, value_levels=v)
    if isinstance(tail_tokens, bool) or not isinstance(tail_tokens, int) or not 0 <= tail_tokens <= MAX_TAIL_TOKENS:
        raise CodecError(f"tail_tokens must be an integer in [0, {MAX_TAIL_TOKENS}], got {tail_tokens!r}")
    return dataclasses.replace(level, key_levels=k, value_levels=v, tail_tokens=tail_tokens)


def save_schedule(path: str | os.PathLike, level: str, key_levels: Sequence[int], value_levels: Sequence[int],
                  tail_tokens: int | None = None) -> Path:
    """Writes a schedule (JSON: format, level, key_levels, value_levels, and tail_tokens when given) atomically."""
    with_schedule(LEVELS[level], key_levels, value_levels, tail_tokens)  # validates
    doc: dict[str, object] = {"format": SCHEDULE_FORMAT, "level": level, "key_levels": [int(b) for b in key_levels],
                              "value_levels": [int(b) for b in value_levels]}
    if tail_tokens is not None:
        doc["tail_tokens"] = tail_tokens
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    tmp.replace(path)
    return path


def read_schedule(path: str | os.PathLike) -> tuple[str, tuple[int, ...], tuple[int, ...], int | None]:
    """(level name, key counts, value counts, tail_tokens or None when the file sets none) of a schedule
    file; CodecError if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != SCHEDULE_FORMAT or doc.get("level") not in LEVELS:
            raise CodecError(f"{path} is not a kvmesh level schedule ({SCHEDULE_FORMAT}) of a known level")
        k, v, tail = tuple(doc["key_levels"]), tuple(doc["value_levels"]), doc.get("tail_tokens")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CodecError(f"cannot read level schedule {path}: {e}") from None
    with_schedule(LEVELS[doc["level"]], k, v, tail)
    return doc["level"], k, v, tail

