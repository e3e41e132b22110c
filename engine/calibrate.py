"""Make a served model's codec files (query profile, layer predictors, level schedules) from the model itself.

cachegen meets its size/quality goals only with the served model's files (kvmesh.codecs.model_files):
the query profile its key rounding follows, the layer predictors its cross-layer prediction codes
against, and per-layer level schedules. They are properties of the model, measured once on ordinary
text. This module is the one recipe that makes them, for ``kvmesh-serve`` (at first start), for the
CLI, and for the benchmarks:

    python -m kvmesh.engine.calibrate HuggingFaceTB/SmolLM2-135M-Instruct          # the built-in model
    python -m kvmesh.engine.calibrate /models/Llama-3.2-1B --out ./model-files --text my.txt
    kvmesh-model-files MODEL [--out DIR] [--text FILE ...]

The calibration text ships with the package (engine/data/calibration/, README there says what it is
and where it comes from), so the files are made offline. One forward pass per window gives both the
query moments (through a tap on the rotary function) and the KV the predictors are fitted on.

The folder appears whole or not at all: the files are written into a temporary folder beside it,
which is then renamed into place (a reader never finds a half-made folder).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvmesh.codecs.cachegen.levels import LEVELS, with_schedule
from kvmesh.codecs.cachegen.predict import DEFAULT_RIDGE, LayerPredictor, fit
from kvmesh.codecs.cachegen.rounding import DEFAULT_DAMP, QueryProfile
from kvmesh.codecs.model_files import model_folder, model_key, save_model_files
from kvmesh.engine.kv import kv_from_cache
from kvmesh.engine.model import file_lock
from kvmesh.engine.profile import _rotary_tap

WINDOW_TOKENS = 1024
CHUNK_TOKENS = 256
RECIPE_FILE = "calibration.json"
# Bumped whenever the recipe's output changes for the same model and text: a maker of cached files
# compares it (RECIPE_FILE's "recipe_version") to know its files are stale.
RECIPE_VERSION = 5
BUILTIN_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """What the files are made with. The defaults are the tuned ones (BENCHMARKS.md, "Model files
    and quality (issue 17.1)"); the benchmarks vary them, on calibration text only."""

    # windows of WINDOW_TOKENS tokens of the calibration text, taken from its texts in turn: with the packaged
    # corpus, 8 of prose (lcet10) and the 4 that its C file has (recipe v5: the predictor then codes source
    # code ~10% smaller at the same quality, prose as before; BENCHMARKS.md "Recipe v5")
    windows: int = 12
    damp: float = DEFAULT_DAMP  # the query profile's damping (rounding.py)
    ridge: float = DEFAULT_RIDGE  # the layer predictors' ridge (predict.py)
    predictor_levels: tuple[str, ...] = ("default",)  # a predictor fitted for each of these levels
    # level -> schedule: "builtin" writes the level's own table resolved to the model's depth, so the
    # counts travel with the files (and a retuned table in a later release does not change old files);
    # "tuned" writes the recipe's own table for that level (TUNED_SCHEDULES), resolved the same way
    schedules: dict[str, str] = field(default_factory=lambda: {"default": "tuned", "hq": "builtin"})
    # written into every schedule: a partial chunk's (the end of a stored prompt's) last this many rows are
    # kept at 8 bits (levels.Level.tail_for). The first tokens generated after a prompt attend most to its
    # last tokens: with SmolLM2, coding them at the default level's steps flipped the quick start's answer
    # (BENCHMARKS.md, "Model files and quality"). Whole chunks are unchanged by it.
    tail_tokens: int = 16


# ----------------------------------------------------------------------------------------------
# The calibration text
# ----------------------------------------------------------------------------------------------

def corpus_files() -> list[Path]:
    """The packaged calibration texts (engine/data/calibration/*.txt), sorted by name."""
    folder = resources.files("kvmesh.engine") / "data" / "calibration"
    return sorted((Path(str(p)) for p in folder.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)


def corpus_texts(paths: Sequence[str | os.PathLike] | None = None) -> dict[str, str]:
    """name -> UTF-8 text of the given files, or of the packaged corpus when none are given."""
    files = [Path(p) for p in paths] if paths else corpus_files()
    if not files:
        raise ValueError("no calibration text: the package's engine/data/calibration/ is empty and no --text was given")
    texts = {}
    for path in files:
        try:
            texts[path.name] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read calibration text {path}: {e}") from None
    return texts


def calibration_windows(tokenizer: Any, texts: dict[str, str], n: int, window: int = WINDOW_TOKENS) -> list[list[int]]:
    """Up to ``n`` windows of ``window`` token ids: each text cut into whole windows, then taken round-robin
    over the texts (so every kind of text is measured even when ``n`` is small). A text shorter than one
    window gives one shorter window."""
    per_text = []
    for text in texts.values():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = [ids[i:i + window] for i in range(0, max(len(ids) - window, 0) + 1, window)]
        per_text.append([w for w in cut if len(w) >= min(window, CHUNK_TOKENS)])
    out: list[list[int]] = []
    for i in range(max(map(len, per_text), default=0)):
        out.extend(ws[i] for ws in per_text if i < len(ws))
    if not out:
        raise ValueError(f"the calibration text gives no window of {CHUNK_TOKENS}+ tokens")
    return out[:n]


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------

def _cache_of(out: Any) -> Any:
    """The KV cache of a model output (transformers 5.2x calls it ``cache``, earlier ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def measure(model: Any, windows: Sequence[Sequence[int]], progress: Progress | None = None
            ) -> tuple[np.ndarray, list[torch.Tensor]]:
    """One prefill per window: (float64 [L, kv_heads, hd, hd] E[q q^T] of the post-RoPE queries summed over
    the query heads of each KV head, the windows' KV cut into fp16 chunks [2, L, CHUNK_TOKENS, C])."""
    cfg = model.config
    L, nq = cfg.num_hidden_layers, cfg.num_attention_heads
    nkv = getattr(cfg, "num_key_value_heads", None) or nq
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nq
    acc = torch.zeros(L, nkv, hd, hd, dtype=torch.float64)
    seen = [0] * L

    def sink(layer: int, q: torch.Tensor) -> None:
        # fp32 products over one window (a few thousand terms), summed over windows in float64
        g = q[0].to("cpu", torch.float32).reshape(nkv, nq // nkv, -1, hd).reshape(nkv, -1, hd)
        acc[layer] += torch.bmm(g.transpose(1, 2), g).double()
        seen[layer] += g.shape[2]

    chunks: list[torch.Tensor] = []
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.inference_mode(), _rotary_tap(model, sink):
        for i, w in enumerate(windows):
            out = model(torch.tensor(list(w), dtype=torch.long, device=device).unsqueeze(0), use_cache=True)
            kv = kv_from_cache(_cache_of(out)).to("cpu", torch.float16)
            for start in range(0, kv.shape[2] - CHUNK_TOKENS + 1, CHUNK_TOKENS):
                chunks.append(kv[:, :, start:start + CHUNK_TOKENS].contiguous())
            if progress is not None:
                progress(f"calibration: window {i + 1}/{len(windows)} measured ({time.perf_counter() - t0:.0f} s)")
    if min(seen) == 0 or not chunks:
        raise ValueError("the calibration windows gave no tokens to measure")
    return (acc / torch.tensor(seen, dtype=torch.float64)[:, None, None, None]).numpy(), chunks


# The default level's counts per layer (30-layer reference depth, sampled for other depths like the
# named levels): SmolLM2-135M's own layer sensitivity with its recipe-v1 files on the calibration corpus
# (bench/layer_sensitivity.py --method cachegen --files ROOT --source calibration; BENCHMARKS.md "Model
# files and quality (issue 17.1)"), the bits moved to the layers whose decoded K/V move the output most
# at about the same total. Never measured on an evaluation text.
TUNED_SCHEDULES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # recipe v5: recipe v4's key counts with B - 1 scaled by 1.15 (rounded; values unchanged). The predictor
    # fitted on code as well as prose (the corpus's C file) codes source code ~10% smaller, and these steps
    # spend part of that on quality everywhere: on validation texts (16 windows; bench/realkv.py "valcode",
    # zlib's gzlog.c, "botchan", "heldout") KL -23 / -11 / -11 / -9% for -3.7% bytes against the same files
    # at scale 1.0, beside scales 1.08, 1.2 and 1.25; v5's files against v4's: KL -1 / -25 / -11 / -12%
    # (BENCHMARKS.md "Recipe v5"). Never measured on an evaluation text.
    # recipe v4's table: a mix of two kinds of text, each half the weight. Prose: the parts measured for
    # recipe v2 at the built-in default table (2 windows of lcet10, bench/realkv.py "calibration", windows 1
    # and 2 of 4); code: 2 windows of the validation C++ file (bench/realkv.py "valcode", windows 1 and 2 of
    # 4) measured at recipe v3's table (bench/layer_sensitivity.py --method cachegen --files ROOT). Each part
    # is carried to v3's counts at high rate (part ~ a * step^2), the two kinds normalised to equal KL and
    # averaged, then --damp 0.5 --scale 0.98 --floor 4,5 from v3's table: predicted KL x0.86 (code) / x0.92
    # (prose) at 0.019 bits fewer per layer.
    # v3's table (recipe v2 and v3): the prose parts alone, --damp 0.5 --scale 0.95 from the built-in table.
    "default": ((7, 13, 23, 22, 15, 19, 22, 31, 33, 26, 55, 9, 14, 14, 25,
                 22, 13, 42, 61, 17, 40, 25, 21, 47, 34, 9, 23, 8, 16, 11),
                (11, 7, 7, 5, 5, 5, 5, 7, 11, 7, 9, 5, 7, 5, 7,
                 11, 7, 13, 17, 7, 11, 11, 5, 13, 11, 5, 7, 5, 7, 5)),
}


def _schedule(level: str, how: str, layers: int) -> tuple[list[int], list[int]]:
    """(key counts, value counts) for ``layers`` layers from a schedule source ("builtin" or "tuned")."""
    if how == "builtin":
        base = LEVELS[level]
    elif how == "tuned" and level in TUNED_SCHEDULES:
        base = with_schedule(LEVELS[level], *TUNED_SCHEDULES[level])
    else:
        valid = "builtin" + (", tuned" if level in TUNED_SCHEDULES else "")
        raise ValueError(f"unknown schedule source {how!r} for level {level!r}; valid: {valid}")
    counts = base.levels_for(layers)
    return [int(b) for b in counts[0]], [int(b) for b in counts[1]]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def _swap_into_place(made: Path, target: Path) -> None:
    """Renames the finished folder ``made`` to ``target``; a folder already there is moved aside first
    and dropped after, so ``target`` is at every moment either the old whole folder or the new one."""
    with file_lock(target.parent / f".{target.name}.lock"):
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "files")
        os.replace(made, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recipe_version(folder: str | os.PathLike) -> int | None:
    """The recipe version that made the files in ``folder`` (its RECIPE_FILE), or None when no recipe
    made them (no or an unreadable RECIPE_FILE: files made some other way, left alone)."""
    try:
        version = json.loads((Path(folder) / RECIPE_FILE).read_text()).get("recipe_version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def corpus_digest(texts: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(texts):
        h.update(name.encode() + b"\0" + texts[name].encode() + b"\0")
    return h.hexdigest()[:16]


def make_model_files(model: Any, tokenizer: Any, model_name: str, root: str | os.PathLike | None = None,
                     progress: Progress | None = None, *, texts: dict[str, str] | None = None,
                     recipe: Recipe | None = None) -> Path:
    """Runs the calibration forward passes on ``texts`` (default: the packaged corpus), fits the query
    profile, the layer predictor of each of the recipe's levels and its schedules, and writes them as
    ``model_name``'s files under ``root`` (default: the cache folder, kvmesh.codecs.model_files).
    Returns the folder. The folder is renamed into place whole when every file is written."""
    recipe = recipe or Recipe()
    say = progress or (lambda _msg: None)
    texts = texts if texts is not None else corpus_texts()
    target = model_folder(model_name, root)
    t0 = time.perf_counter()
    windows = calibration_windows(tokenizer, texts, recipe.windows)
    say(f"calibration: {len(windows)} windows, {sum(map(len, windows))} tokens of {', '.join(texts)}")
    moments, chunks = measure(model, windows, say)
    profile = QueryProfile(moments, recipe.damp)
    layers = int(model.config.num_hidden_layers)
    schedules = {level: (*_schedule(level, how, layers), recipe.tail_tokens) for level, how in recipe.schedules.items()}
    predictors: dict[str, LayerPredictor] = {}
    for level in recipe.predictor_levels:
        t1 = time.perf_counter()  # refit on the KV as the level decodes it with the counts it will use
        counts = schedules[level][:2] if level in schedules else None  # the chunks are whole: no tail
        predictors[level] = fit(chunks, level=level, ridge=recipe.ridge, schedule=counts)
        say(f"calibration: layer predictor for level {level} fitted on {len(chunks)} chunks "
            f"({time.perf_counter() - t1:.0f} s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        found = save_model_files(model_name, profile, predictors, root=staging, schedules=schedules)
        meta = {"model": model_name, "recipe_version": RECIPE_VERSION, "recipe": asdict(recipe),
                "corpus": sorted(texts), "corpus_sha256": corpus_digest(texts),
                "windows": len(windows), "tokens": sum(map(len, windows)), "chunks": len(chunks),
                "query_profile": profile.fingerprint(),
                "predictors": {k: v.ident.hex() for k, v in predictors.items()},
                "seconds": round(time.perf_counter() - t0, 1)}
        (found.folder / RECIPE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        _swap_into_place(found.folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"calibration: wrote {target} in {time.perf_counter() - t0:.0f} s")
    return target


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def load_any_model(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 eval mode, offline: the built-in SmolLM2 by its name, else any
    Hugging Face causal LM from a local folder or the Hugging Face cache."""
    if name == BUILTIN_MODEL:
        from kvmesh.engine.model import load_model

        return load_model(torch.float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot load model {name!r} offline (a local folder or a model in the Hugging Face "
                         f"cache): {e}") from None
    model.eval()
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvmesh-model-files", description=__doc__.split("\n", 1)[0])
    p.add_argument("model", help=f"a Hugging Face model id in the local cache, a model folder, or {BUILTIN_MODEL} "
                                 "(the built-in engine's model)")
    p.add_argument("--out", default=None, help="the model-files root to write into (default: the cache "
                                               "folder, $KVMESH_CACHE_DIR/model-files)")
    p.add_argument("--name", default=None, help="the name the files are found by (default: MODEL)")
    p.add_argument("--text", action="append", default=[], type=Path,
                   help="a UTF-8 calibration text (repeatable; default: the packaged corpus)")
    p.add_argument("--windows", type=int, default=Recipe.windows,
                   help=f"at most this many windows of {WINDOW_TOKENS} tokens")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.windows < 1:
        p.error("--windows must be >= 1")
    try:
        model_key(args.name or args.model)
        texts = corpus_texts(args.text)
    except Exception as e:  # noqa: BLE001 - a bad name or text is a usage error, said plainly
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_any_model(args.model)
    folder = make_model_files(model, tokenizer, args.name or args.model, args.out,
                              lambda msg: print(msg, file=sys.stderr, flush=True),
                              texts=texts, recipe=Recipe(windows=args.windows))
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
