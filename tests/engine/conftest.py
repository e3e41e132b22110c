"""Shared fixtures for the engine tests: the real SmolLM2 model, loaded once per session."""
from __future__ import annotations

from typing import Any

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """``(model, tokenizer)`` in float32, eval mode; converts the GGUF on the first run of a fresh cache."""
    from kvmesh.engine.model import load_model

    # Two cores shared by the whole machine: more threads only adds contention.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model(torch.float32)


@pytest.fixture(scope="session")
def smollm2_model(smollm2: tuple[Any, Any]) -> Any:
    return smollm2[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2: tuple[Any, Any]) -> Any:
    return smollm2[1]
