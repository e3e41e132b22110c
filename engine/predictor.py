"""Layer predictors of a served model: what cachegen's cross-layer prediction needs.

A predictor holds, per layer, the linear maps that predict a layer's keys and values from the layers
decoded before it (kvmesh.codecs.cachegen.predict). It is a property of the model, fitted once on the
KV of ordinary prose; the codec then codes every chunk as its residual from the prediction, about 18%
fewer bytes at the same step. A container coded with a predictor needs the same predictor to decode.
Predictors are ``.npz`` files without pickles.

    python -m kvmesh.engine.predictor --text prose.txt --out smollm2-layers.npz
    # then, in the agent's config (LMCache-style yaml):  extra_config: {cachegen_layer_predictor: smollm2-layers.npz}
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kvmesh.codecs.cachegen.predict import LayerPredictor, fit
from kvmesh.engine.kv import kv_from_cache
from kvmesh.engine.profile import text_windows

CHUNK_TOKENS = 256


def kv_chunks(model: Any, windows: Iterable[Sequence[int]], chunk: int = CHUNK_TOKENS) -> Iterator[torch.Tensor]:
    """The model's KV [2, L, chunk, C] of each window (one prefill each), cut into whole chunks."""
    with torch.inference_mode():
        for w in windows:
            if len(w) < chunk:
                continue
            kv = kv_from_cache(model(torch.tensor(list(w), dtype=torch.long).unsqueeze(0), use_cache=True).cache)
            for start in range(0, kv.shape[2] - chunk + 1, chunk):
                yield kv[:, :, start:start + chunk].to(torch.float16).contiguous()


def layer_predictor(model: Any, windows: Iterable[Sequence[int]], level: str = "default") -> LayerPredictor:
    return fit(kv_chunks(model, windows), level=level)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmesh.engine.predictor",
                                description="Fit the embedded model's layer predictor on a prose file.")
    p.add_argument("--text", required=True, type=Path, help="UTF-8 prose to run the model on")
    p.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    p.add_argument("--windows", type=int, default=8, help="at most this many windows of 1,024 tokens")
    p.add_argument("--level", default="default", help="the cachegen level to fit for (default, hq, compact)")
    args = p.parse_args(argv)
    from kvmesh.engine.model import load_model

    model, tokenizer = load_model()
    windows = text_windows(tokenizer, args.text.read_text(encoding="utf-8"), limit=args.windows)
    predictor = layer_predictor(model, windows, args.level)
    predictor.save(args.out)
    print(f"{args.out}: {predictor.layers} layers x {predictor.channels} channels, "
          f"{sum(map(len, windows))} tokens, id {predictor.ident.hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
