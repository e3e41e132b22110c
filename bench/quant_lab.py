"""Quantization lab: try a cachegen quantizer variant on the real-KV setup without writing a codec.

Each experiment is a function ``chunk fp32 [2, 30, 256, 192] -> (decoded chunk, bytes)``; the bytes are
counted the way the cachegen container would spend them (symbols at the integer cost of the best of the
64 shared tables, stream meta, lengths, rANS flush, side information), and quality is bench/realkv.py's
(1,024 context tokens replaced, 256 continuation tokens, NLL change and top-1 agreement). The estimate
matches the real codec within ~1% on the default level (5.75x here against 5.82x measured) and the quality
columns are exact. Rates are counted over the four context chunks of each window.

    python bench/quant_lab.py --list
    python bench/quant_lab.py sensitivity sinks [--source heldout] [--windows 8]

What each experiment showed on 2026-11-28 is recorded in BENCHMARKS.md ("Quantization lab").
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.realkv as rk  # noqa: E402
from kvmesh.codecs.cachegen import quant  # noqa: E402
from kvmesh.codecs.cachegen.backends import CpuBackend  # noqa: E402
from kvmesh.codecs.cachegen.layout import stream_layout  # noqa: E402
from kvmesh.codecs.cachegen.levels import LEVELS  # noqa: E402
from kvmesh.codecs.cachegen.tables import alphabet_tables  # noqa: E402

Half = Callable[[torch.Tensor], tuple[torch.Tensor, float]]  # x [L, T, C] -> (x', bytes)
_BACKEND = CpuBackend()
DEFAULT = LEVELS["default"].levels_for(30)


# --- byte accounting ------------------------------------------------------------------------------

def coded_bytes(q: torch.Tensor, levels: np.ndarray) -> float:
    """Bytes cachegen spends on symbols of q uint8 [L, T, C] (one of K/V) coded with ``levels`` [L]:
    integer table cost of the chosen tables, plus per channel stream 2 meta bytes and a quarter of a coded
    stream's 11 length bits and 4 flush bytes (4 channels share one rANS state)."""
    L, T, C = q.shape
    lv = np.stack([levels, levels])
    layout = stream_layout(L, T, C, lv)
    hist = _BACKEND.histogram(torch.stack([q, q]), layout)
    center, table = _BACKEND.choose_tables(hist, layout)
    bits = 0.0
    for b, rows in layout.groups:
        tabs = alphabet_tables(b)
        shift = (np.arange(b)[None, :] + center[rows, None].astype(np.int64)) % b
        hr = np.take_along_axis(hist[rows], shift, axis=1)
        bits += float((hr * tabs.cost[table[rows].astype(np.int64)]).sum()) / 256.0
    streams = layout.num_streams
    return (bits / 8 + streams * (2 + (11 / 8 + 4) / 4)) / 2


def _side_bytes(side: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in side)


def uniform(levels: np.ndarray | list[int], mode: int) -> Half:
    """The frozen cachegen quantizer (quant.py) with one level count per layer."""
    levels = np.asarray(levels)
    lvt = torch.tensor(levels, dtype=torch.float32)

    def half(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        q, side = quant.quantize(x, lvt, mode)
        return quant.dequantize(q, side, lvt, mode), coded_bytes(q, levels) + _side_bytes(side)
    return half


def keys(levels: np.ndarray | list[int]) -> Half:
    return uniform(levels, quant.MODE_CHANNEL_SHARED_STEP)


def values(levels: np.ndarray | list[int]) -> Half:
    return uniform(levels, quant.MODE_TOKEN_SYMMETRIC)


def q8_per_token(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(-1, keepdim=True)
    step = (x.amax(-1, keepdim=True) - lo).clamp_min(1e-8) / 255
    return torch.round((x - lo) / step) * step + lo


def protect(half: Half, threshold: float) -> Half:
    """Tokens whose L2 norm in a layer is below ``threshold`` x the layer's median norm in the chunk
    (the attention-sink-like tokens: in SmolLM2 the ' the' tokens of layers 3-10, with ~0.15-0.3x the
    median V norm) are stored at 8 bits per token on top (their stream symbols are still counted)."""
    def wrapped(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        y, nbytes = half(x)
        n = x.norm(dim=-1)
        sel = n < threshold * n.median(dim=1, keepdim=True).values
        y[sel] = q8_per_token(x[sel])
        return y, nbytes + int(sel.sum()) * (x.shape[-1] + 4) + sel.numel() / 8
    return wrapped


def channel_gains(half: Half, gain: torch.Tensor) -> Half:
    """Quantize x * gain[layer, channel] and divide back: a finer step where gain is large (1 byte per gain)."""
    def wrapped(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        y, nbytes = half(x * gain[:, None, :])
        return y / gain[:, None, :], nbytes + gain.numel()
    return wrapped


def query_energy(source: str = "botchan", n_windows: int = 8) -> torch.Tensor:
    """E[q_c^2] per (layer, KV channel): post-RoPE queries of the model's prefill of the windows, summed
    over the query heads sharing each KV head (the weight of a key channel's error in the logits)."""
    import transformers.models.llama.modeling_llama as llama

    model, _ = rk._model()
    cfg = model.config
    L, nq, nkv, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    acc = torch.zeros(L, nq, hd, dtype=torch.float64)
    calls = [0, 0]  # rotary calls so far, tokens seen
    original = llama.apply_rotary_pos_emb

    def capture(q, k, cos, sin, *args, **kwargs):  # noqa: ANN001, ANN202 - transformers' signature
        qe, ke = original(q, k, cos, sin, *args, **kwargs)
        layer = calls[0] % L
        calls[0] += 1
        acc[layer] += qe[0].double().pow(2).sum(1)
        if layer == 0:
            calls[1] += qe.shape[2]
        return qe, ke

    llama.apply_rotary_pos_emb = capture
    try:
        with torch.inference_mode():
            for w in rk.windows(source, n_windows):
                model(torch.tensor(w[:rk.CONTEXT_TOKENS + rk.CONTINUATION_TOKENS]).unsqueeze(0))
    finally:
        llama.apply_rotary_pos_emb = original
    return (acc / calls[1]).reshape(L, nkv, nq // nkv, hd).sum(2).reshape(L, nkv * hd).float()


# --- evaluation -----------------------------------------------------------------------------------

def evaluate(k: Half | None, v: Half | None, source: str, n_windows: int) -> dict[str, float]:
    """K and V through their halves (None = kept exact, no bytes); the first token of each chunk
    stays exact (cachegen stores it at 8 bits apart: measured the same quality either way)."""
    raw = spent = 0.0
    nll_d, top1 = [], []
    for w in rk.windows(source, n_windows):
        rec = rk._window_record(w)
        decoded = []
        for start in range(0, rk.CONTEXT_TOKENS, rk.CHUNK_TOKENS):
            chunk = rec["kv"][:, :, start:start + rk.CHUNK_TOKENS].float()
            out = chunk.clone()
            for i, half in ((0, k), (1, v)):
                if half is not None:
                    y, nbytes = half(chunk[i, :, 1:])
                    out[i, :, 1:] = y
                    spent += nbytes
            raw += chunk.numel() * 2
            decoded.append(out.to(torch.float16).float())
        ids = rec["tokens"]
        cont = ids[rk.CONTEXT_TOKENS:rk.CONTEXT_TOKENS + rk.CONTINUATION_TOKENS]
        targets = ids[rk.CONTEXT_TOKENS + 1:rk.CONTEXT_TOKENS + rk.CONTINUATION_TOKENS + 1]
        nll, argmax = rk._nll_and_argmax(rk._continue(torch.cat(decoded, dim=2), cont), targets)
        nll_d.append(float((nll - rec["orig_nll"]).mean()))
        top1.append(float((argmax == rec["orig_argmax"]).float().mean()))
    return {"ratio": raw / max(spent, 1.0), "nll": float(np.mean(nll_d)), "top1": float(np.mean(top1))}


# --- experiments ----------------------------------------------------------------------------------

def exp_baseline() -> list[tuple[str, Half | None, Half | None]]:
    """The default level through this estimator (check it against bench/bench_codecs.py)."""
    return [("default level (estimate)", keys(DEFAULT[0]), values(DEFAULT[1]))]


def exp_sensitivity() -> list[tuple[str, Half | None, Half | None]]:
    """K alone (V exact) and V alone (K exact): ratio counts K+V fp16 over the one half's bytes, so a
    half at 16x here spends 2 bits per element of its own."""
    rows = [(f"K {b} levels, V exact", keys([b] * 30), None) for b in (12, 16, 24, 32)]
    rows += [(f"V {b} levels, K exact", None, values([b] * 30)) for b in (5, 7, 9, 13)]
    return rows


def exp_sinks() -> list[tuple[str, Half | None, Half | None]]:
    """Sink-like tokens (small norm, heavily attended) at 8 bits on top of the uniform quantizer."""
    return [
        ("V 7 levels, K exact", None, values([7] * 30)),
        ("V 7 + sink-like tokens (norm < 0.35 median) at 8 bits", None, protect(values([7] * 30), 0.35)),
        ("K 16 levels, V exact", keys([16] * 30), None),
        ("K 16 + tokens with norm < 0.7 median at 8 bits", protect(keys([16] * 30), 0.7), None),
        ("default K, V 7 + sinks", keys(DEFAULT[0]), protect(values([7] * 30), 0.5)),
    ]


def exp_query_weights() -> list[tuple[str, Half | None, Half | None]]:
    """Key channels weighted by the model's query energy (a calibrated, model-specific profile)."""
    w = query_energy("botchan")
    gain = (w / w.mean(1, keepdim=True)).pow(0.25)
    return [
        ("K 24 levels, V exact", keys([24] * 30), None),
        ("K 24, channel gains (E[q^2])^0.25 from botchan queries", channel_gains(keys([24] * 30), gain), None),
        ("K gains + sinks, V 7 + sinks", protect(channel_gains(keys([24] * 30), gain), 0.7),
         protect(values([7] * 30), 0.35)),
    ]


def shrink(half_levels: list[int], mode: int, delta: float) -> Half:
    """The frozen quantizer, but each non-central bin reconstructed delta steps nearer the stream's
    median symbol (a centroid-like reconstruction: lower MSE on peaked data)."""
    levels = np.asarray(half_levels)
    lvt = torch.tensor(levels, dtype=torch.float32)

    def half(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        q, side = quant.quantize(x, lvt, mode)
        y = quant.dequantize(q, side, lvt, mode)
        step = quant.dequantize(torch.ones_like(q), side, lvt, mode) - quant.dequantize(torch.zeros_like(q), side, lvt, mode)
        qf = q.float()
        y = y - delta * step * torch.sign(qf - qf.median(dim=1, keepdim=True).values)
        return y, coded_bytes(q, levels) + _side_bytes(side)
    return half


def debiased(half: Half) -> Half:
    """Adds back the mean quantization error of every (layer, channel) over the chunk (fp16 each)."""
    def wrapped(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        y, nbytes = half(x)
        corr = (x - y).mean(dim=1, keepdim=True).half().float()
        return y + corr, nbytes + corr.numel() * 2
    return wrapped


def exp_reconstruction() -> list[tuple[str, Half | None, Half | None]]:
    """Lower-MSE reconstructions at the same bytes: shrinking bins toward the centre, removing the
    per-channel bias, a uniform value step (mode 3) instead of per-token scales."""
    v7 = protect(values([7] * 30), 0.35)
    return [
        ("V 7 + sinks, K exact", None, v7),
        ("V 7 shrunk 0.1 step + sinks", None, protect(shrink([7] * 30, quant.MODE_TOKEN_SYMMETRIC, 0.1), 0.35)),
        ("V 7 shrunk 0.2 step + sinks", None, protect(shrink([7] * 30, quant.MODE_TOKEN_SYMMETRIC, 0.2), 0.35)),
        ("V 7 debiased per channel + sinks", None, protect(debiased(values([7] * 30)), 0.35)),
        ("V 9, one step per layer (mode 3) + sinks", None, protect(uniform([9] * 30, quant.MODE_CHANNEL_SHARED_STEP), 0.35)),
        ("K 16, V exact", keys([16] * 30), None),
        ("K 16 shrunk 0.1 step", shrink([16] * 30, quant.MODE_CHANNEL_SHARED_STEP, 0.1), None),
        ("K 16 debiased per channel", debiased(keys([16] * 30)), None),
    ]


def rounded_keys(levels: np.ndarray | list[int], profile: object) -> Half:
    """The frozen key quantizer (mode 3), symbols chosen by cachegen's query-aware rounding (rounding.py)."""
    levels = np.asarray(levels)
    lvt = torch.tensor(levels, dtype=torch.float32)
    mode = quant.MODE_CHANNEL_SHARED_STEP

    def half(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        q, side = _BACKEND.quantize_half(x.contiguous(), levels, mode, profile)
        return quant.dequantize(q, side, lvt, mode), coded_bytes(q, levels) + _side_bytes(side)
    return half


def exp_query_rounding() -> list[tuple[str, Half | None, Half | None]]:
    """Keys rounded along the model's query profile (measured on the calibration text, rk.query_profile)."""
    p = rk.query_profile()
    v = protect(values(DEFAULT[1]), 0.35)
    rows: list[tuple[str, Half | None, Half | None]] = []
    for b in (12, 16, 24):
        rows += [(f"K {b}, V exact", keys([b] * 30), None), (f"K {b} rounded along the profile, V exact", rounded_keys([b] * 30, p), None)]
    rows += [("default level (K 20/28/14, V 7 + sinks)", keys(DEFAULT[0]), v),
             ("default level, keys rounded along the profile", rounded_keys(DEFAULT[0], p), v),
             ("K 16/24/12 rounded, V 7 + sinks", rounded_keys([16] * 10 + [24] * 15 + [12] * 5, p), v)]
    return rows


def exp_value_layers() -> list[tuple[str, Half | None, Half | None]]:
    """Values at 5 or 9 levels in one block of 5 layers (7 elsewhere, sink-like rows protected, K exact);
    then the compact level's bands against the default's."""
    rows: list[tuple[str, Half | None, Half | None]] = [("V 7 + sinks, K exact", None, protect(values([7] * 30), 0.35))]
    for b in (5, 9):
        for first in range(0, 30, 5):
            lv = [7] * 30
            lv[first:first + 5] = [b] * 5
            rows.append((f"V {b} in layers {first}-{first + 4}, 7 elsewhere", None, protect(values(lv), 0.35)))
    compact = LEVELS["compact"].levels_for(30)
    rows += [("default level", keys(DEFAULT[0]), protect(values(DEFAULT[1]), 0.35)),
             ("compact level (V 5 in layers 10-14, 25-29)", keys(compact[0]), protect(values(compact[1]), 0.35))]
    return rows


EXPERIMENTS: dict[str, Callable[[], list[tuple[str, Half | None, Half | None]]]] = {
    "baseline": exp_baseline,
    "sensitivity": exp_sensitivity,
    "sinks": exp_sinks,
    "query-weights": exp_query_weights,
    "reconstruction": exp_reconstruction,
    "query-rounding": exp_query_rounding,
    "value-layers": exp_value_layers,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("experiments", nargs="*", default=["baseline"])
    parser.add_argument("--source", default="botchan", choices=list(rk.SOURCES))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        for name, fn in EXPERIMENTS.items():
            doc = (fn.__doc__ or "").strip()
            print(f"{name}: {doc.splitlines()[0] if doc else ''}")
        return 0
    unknown = [e for e in args.experiments if e not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; --list shows them")
    torch.set_num_threads(max(1, min(rk.MAX_THREADS, torch.get_num_threads())))
    print(f"\n{args.windows} windows of {args.source}; ratio = fp16 bytes / estimated cachegen bytes\n")
    print("| experiment | ratio | NLL change | top-1 | seconds |\n| --- | --- | --- | --- | --- |")
    for name in args.experiments:
        for label, k, v in EXPERIMENTS[name]():
            t0 = time.perf_counter()
            r = evaluate(k, v, args.source, args.windows)
            print(f"| {label} | {r['ratio']:.2f}x | {r['nll']:+.4f} | {100 * r['top1']:.1f}% "
                  f"| {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
