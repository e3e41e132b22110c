"""Query profiles of a served model: what cachegen's query-aware key rounding needs.

A profile holds E[q q^T] of the post-RoPE queries per (layer, KV head), summed over the query heads that
share the KV head (kvmesh.codecs.cachegen.rounding). It is a property of the model, measured once on
ordinary prose; the codec then rounds every chunk's keys along it. Profiles are ``.npz`` files
without pickles.

    python -m kvmesh.engine.profile --text prose.txt --out smollm2-queries.npz
    # then, in the agent's config (LMCache-style yaml):  extra_config: {cachegen_key_profile: smollm2-queries.npz}

Works for the Llama family of transformers (SmolLM2, Llama, Mistral, Qwen2: models whose attention
calls ``modeling_llama.apply_rotary_pos_emb``-style rotary functions with (q, k, cos, sin)).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvmesh.codecs.cachegen.rounding import DEFAULT_DAMP, QueryProfile

WINDOW_TOKENS = 1024


@contextlib.contextmanager
def _rotary_tap(model: Any, sink: Any) -> Iterator[None]:
    """Calls sink(layer, q) with the post-RoPE queries [batch, heads, tokens, head_dim] of every
    attention layer the model runs while inside."""
    family = importlib.import_module(type(model).__module__)
    original = getattr(family, "apply_rotary_pos_emb", None)
    if original is None:
        raise ValueError(f"{type(model).__name__}: no apply_rotary_pos_emb in {family.__name__}; "
                         "query profiles support the Llama family of transformers")
    current = [0]
    hooks = [layer.self_attn.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i))
             for i, layer in enumerate(model.model.layers)]

    def tapped(q, k, cos, sin, *args, **kwargs):  # noqa: ANN001, ANN202 - transformers' signature
        qe, ke = original(q, k, cos, sin, *args, **kwargs)
        sink(current[0], qe)
        return qe, ke

    setattr(family, "apply_rotary_pos_emb", tapped)
    try:
        yield
    finally:
        setattr(family, "apply_rotary_pos_emb", original)
        for h in hooks:
            h.remove()


def query_moments(model: Any, windows: Iterable[Sequence[int]]) -> np.ndarray:
    """float64 [layers, kv_heads, head_dim, head_dim]: E[q q^T] over every position of the windows
    (token id lists, each one prefill), summed over the query heads of each KV head."""
    cfg = model.config
    L, nq, nkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nq
    acc = torch.zeros(L, nkv, hd, hd, dtype=torch.float64)
    seen = [0] * L

    def sink(layer: int, q: torch.Tensor) -> None:
        g = q[0].to(torch.float64).reshape(nkv, nq // nkv, -1, hd)  # [kv head, group, tokens, hd]
        acc[layer] += torch.einsum("hgtc,hgtd->hcd", g, g)
        seen[layer] += g.shape[2]

    with torch.inference_mode(), _rotary_tap(model, sink):
        for w in windows:
            if len(w):
                model(torch.tensor(list(w), dtype=torch.long).unsqueeze(0))
    if min(seen) == 0:
        raise ValueError("no tokens to measure queries on")
    return (acc / torch.tensor(seen, dtype=torch.float64)[:, None, None, None]).numpy()


def query_profile(model: Any, windows: Iterable[Sequence[int]], damp: float = DEFAULT_DAMP) -> QueryProfile:
    return QueryProfile(query_moments(model, windows), damp)


def text_windows(tokenizer: Any, text: str, window: int = WINDOW_TOKENS, limit: int | None = None) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    return out[:limit] if limit else out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmesh.engine.profile",
                                description="Measure the embedded model's query profile on a prose file.")
    p.add_argument("--text", required=True, type=Path, help="UTF-8 prose to run the model on")
    p.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    p.add_argument("--windows", type=int, default=8, help="at most this many windows of 1,024 tokens")
    p.add_argument("--damp", type=float, default=DEFAULT_DAMP)
    args = p.parse_args(argv)
    from kvmesh.engine.model import load_model

    model, tokenizer = load_model()
    windows = text_windows(tokenizer, args.text.read_text(encoding="utf-8"), limit=args.windows)
    profile = query_profile(model, windows, args.damp)
    profile.save(args.out)
    print(f"{args.out}: {profile.layers} layers x {profile.kv_heads} KV heads x {profile.head_dim}, "
          f"{sum(map(len, windows))} tokens, fingerprint {profile.fingerprint()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
