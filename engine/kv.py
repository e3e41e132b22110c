"""Convert between transformers' KV cache and kvmesh's KV tensor layout.

kvmesh's layout for a run of tokens is one tensor ``[2, layers, tokens, kv_heads * head_dim]``:
index 0 holds the keys, 1 the values; a token's heads are concatenated head-major
(channel ``h * head_dim + d``). transformers' ``DynamicCache`` holds per layer
``keys``/``values`` of shape ``[batch=1, kv_heads, tokens, head_dim]``.

The keys are stored **after** rotary position embedding (as transformers caches them), so a chunk
of KV is only valid at the token positions it was computed at: a cached prefix must be reused at
the same positions (which is how prefix caching uses it).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache


def _layer_tensors(past_key_values: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(past_key_values, "layers", None)
    if layers is not None:  # transformers >= 4.56: DynamicCache.layers[i].keys/.values
        return [(layer.keys, layer.values) for layer in layers]
    if hasattr(past_key_values, "key_cache"):  # older DynamicCache
        return list(zip(past_key_values.key_cache, past_key_values.value_cache))
    return [(k, v) for k, v, *_ in past_key_values]  # legacy tuple of (k, v) per layer


def kv_from_cache(past_key_values: Any) -> torch.Tensor:
    """``DynamicCache`` (batch 1) -> ``[2, layers, tokens, kv_heads*head_dim]`` in the cache's dtype and device."""
    pairs = _layer_tensors(past_key_values)
    if not pairs:
        raise ValueError("empty KV cache: no layers")
    keys, values = [], []
    for k, v in pairs:
        if k is None or v is None or k.dim() != 4 or k.shape[0] != 1:
            raise ValueError("expected an initialized cache with batch size 1 and [1, heads, tokens, head_dim] layers")
        # [1, H, T, D] -> [T, H*D]
        keys.append(k[0].permute(1, 0, 2).reshape(k.shape[2], -1))
        values.append(v[0].permute(1, 0, 2).reshape(v.shape[2], -1))
    return torch.stack([torch.stack(keys), torch.stack(values)])


def _kv_geometry(config: Any) -> tuple[int, int, int]:
    layers = int(config.num_hidden_layers)
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return layers, heads, head_dim


def kv_shape(config: Any, tokens: int) -> tuple[int, int, int, int]:
    """The kvmesh KV shape ``(2, layers, tokens, kv_heads*head_dim)`` for a model config."""
    layers, heads, head_dim = _kv_geometry(config)
    return (2, layers, tokens, heads * head_dim)


def cache_from_kv(kv: torch.Tensor, config: Any) -> DynamicCache:
    """Inverse of :func:`kv_from_cache`: a ``DynamicCache`` usable as ``past_key_values``/``cache``.

    The tensors keep ``kv``'s dtype and device; cast ``kv`` to the model's dtype first when they differ.
    """
    layers, heads, head_dim = _kv_geometry(config)
    if kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[1] != layers or kv.shape[3] != heads * head_dim:
        raise ValueError(f"kv shape {tuple(kv.shape)} does not fit the model: expected "
                         f"[2, {layers}, tokens, {heads * head_dim}]")
    tokens = kv.shape[2]
    cache = DynamicCache(config=config)
    for layer in range(layers):
        # [T, H*D] -> [1, H, T, D]; contiguous so later in-place cache growth does not alias kv
        k = kv[0, layer].reshape(tokens, heads, head_dim).permute(1, 0, 2).unsqueeze(0).contiguous()
        v = kv[1, layer].reshape(tokens, heads, head_dim).permute(1, 0, 2).unsqueeze(0).contiguous()
        cache.update(k, v, layer)
    return cache


def concat_kv(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate KV tensors along the token axis (e.g. decoded chunks back into one prefix)."""
    if not parts:
        raise ValueError("no KV parts to concatenate")
    return torch.cat(list(parts), dim=2)


def split_kv(kv: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Split KV along the token axis into ``chunk_size``-token pieces (the last may be shorter)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return list(torch.split(kv, chunk_size, dim=2))
