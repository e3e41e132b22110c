"""``ensure_model_files``: a model's codec files are found, else made once, even when two starts race.

A tiny Llama (two layers, random weights) stands in for the served model: the calibration recipe
is the real one (kvmesh.engine.calibrate), only the model is small, so this runs in seconds."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.codecs import model_files
from kvmesh.codecs.model_files import find_model_files, model_key
from kvmesh.engine.calibrate import RECIPE_FILE, RECIPE_VERSION, recipe_version
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


def _start_twice_at_once(model: Any, tokenizer: Any, root: Path) -> tuple[list[Any], list[str]]:
    """Two starts racing for the same model's files (two threads, one lock): what each found, and every
    progress line either printed."""
    lines: list[str] = []
    found: list[Any] = []

    def start() -> None:
        found.append(ensure_model_files(model, tokenizer, NAME, [root], root=root, progress=lines.append))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return found, lines


def test_two_starts_at_once_make_the_files_once(tiny_llama, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(model_files.ENV_MODEL_FILES, raising=False)
    model, tokenizer = tiny_llama
    root = tmp_path / "files"
    found, lines = _start_twice_at_once(model, tokenizer, root)
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


def _set_recipe_version(folder: Path, version: int) -> None:
    meta_path = folder / RECIPE_FILE
    meta = json.loads(meta_path.read_text())
    meta["recipe_version"] = version
    meta_path.write_text(json.dumps(meta))


def test_files_of_an_older_recipe_are_remade_once(tiny_llama, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(model_files.ENV_MODEL_FILES, raising=False)
    model, tokenizer = tiny_llama
    root = tmp_path / "files"
    made = ensure_model_files(model, tokenizer, NAME, [root], root=root)
    assert recipe_version(made.folder) == RECIPE_VERSION
    _set_recipe_version(made.folder, RECIPE_VERSION - 1)  # as a cache made by the previous release
    found, lines = _start_twice_at_once(model, tokenizer, root)
    assert len(found) == 2 and all(f is not None and f.folder == made.folder for f in found)
    remade = [line for line in lines if "remaking them once" in line]
    assert len(remade) == 1, lines
    assert f"made by recipe version {RECIPE_VERSION - 1}, this release's is {RECIPE_VERSION}" in remade[0]
    assert sum("made meanwhile by another process" in line for line in lines) == 1, lines
    assert recipe_version(made.folder) == RECIPE_VERSION  # the folder now holds this recipe's files
    assert find_model_files(NAME, [root]).codec_options("cachegen")["predictor"].layers == 2

    lines.clear()  # current again: a later start finds them and says nothing
    ensure_model_files(model, tokenizer, NAME, [root], root=root, progress=lines.append)
    assert lines == []


def test_files_not_made_by_the_recipe_or_elsewhere_are_used_as_they_are(tiny_llama, tmp_path: Path,
                                                                       monkeypatch) -> None:
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(model_files.ENV_MODEL_FILES, raising=False)
    model, tokenizer = tiny_llama
    own = tmp_path / "own"  # a folder the user points at, made by an older release
    made = ensure_model_files(model, tokenizer, NAME, [own], root=own)
    _set_recipe_version(made.folder, RECIPE_VERSION - 1)
    before = (made.folder / RECIPE_FILE).read_text()
    lines: list[str] = []
    found = ensure_model_files(model, tokenizer, NAME, [own], root=tmp_path / "cache-root", progress=lines.append)
    assert found.folder == made.folder and lines == [] and (made.folder / RECIPE_FILE).read_text() == before

    (made.folder / RECIPE_FILE).unlink()  # files made some other way (no recipe record) in the folder itself
    found = ensure_model_files(model, tokenizer, NAME, [own], root=own, progress=lines.append)
    assert found.folder == made.folder and lines == [] and recipe_version(made.folder) is None
