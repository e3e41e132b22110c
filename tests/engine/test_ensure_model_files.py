"""``ensure_model_files``: a model's codec files are found, else made once, even when two starts race.

A tiny Llama (two layers, random weights) stands in for the served model: the calibration recipe
is the real one (kvmesh.engine.calibrate), only the model is small, so this runs in seconds."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.codecs import model_files
from kvmesh.codecs.model_files import find_model_files, model_key
from kvmesh.engine.model import ensure_model_files

NAME = "tests/tiny-llama"


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer: Any) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval(), smollm2_tokenizer


def test_two_starts_at_once_make_the_files_once(tiny_llama, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(model_files.ENV_MODEL_FILES, raising=False)
    model, tokenizer = tiny_llama
    root = tmp_path / "files"
    lines: list[str] = []
    found: list[Any] = []

    def start() -> None:
        found.append(ensure_model_files(model, tokenizer, NAME, [root], root=root, progress=lines.append))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(found) == 2 and all(f is not None and f.folder == root / model_key(NAME) for f in found)
    assert sum("making them once" in line for line in lines) == 1, lines
    assert sum("made meanwhile by another process" in line for line in lines) == 1, lines
    assert any(line.startswith(f"codec files of {NAME}: made in") for line in lines), lines
    made = find_model_files(NAME, [root])
    assert made.key_profile is not None and "default" in made.predictors
    opts = made.codec_options("cachegen")
    assert opts["predictor"].layers == 2

    lines.clear()  # a later start finds them and says nothing
    assert ensure_model_files(model, tokenizer, NAME, [root], root=root, progress=lines.append).folder == made.folder
    assert lines == []
