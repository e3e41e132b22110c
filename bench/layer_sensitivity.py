"""Layer sensitivity: each (K/V, layer)'s share of a cachegen level's output error, and a schedule from it.

It measures how much each (K/V, layer) of a level moves the model's output, and prints the level counts
that spend the same bits where they matter.

For each window of the real-KV setup (bench/realkv.py) the context's four chunks go through the codec
once; then, for each (K/V, layer) in turn, only that layer's K or V is replaced by the decoded one (the
rest exact) and the continuation's mean KL(original || decoded) over its 256 tokens is measured. KL is
the smooth measure behind top-1 flips (near-ties that a perturbation of the logits tips over), so it
ranks settings with far less noise than top-1 on a few thousand tokens; the per-layer parts add up to
the whole codec's KL within a few percent.

At high rate a layer's KL falls as its step squared, a_l * 4^-b_l, so the bits that minimize the sum at
a fixed total are b_l = mean + 1/2 log2(a_l / geomean(a)) (reverse water-filling); ``--damp`` scales
that shift (1 = the optimum; less hedges against noise in the a_l) and ``--scale`` multiplies every
step count B - 1 (log2 of it in bits per element on top). A per-token symmetric half keeps B - 1 even,
so that zero stays a level. cachegen-hq's counts came from this at the former uniform hq (K 64, V 33:
``--uniform 64,33``) with ``--damp 1 --scale 1.15 --floor 32,17`` (the floor: no layer gets fewer than half the former
steps, so that a layer another model needs is not starved by SmolLM2's table).

    python bench/layer_sensitivity.py [--method cachegen-hq+qp+lp | --method cachegen --files ROOT] [--source calibration] [--windows 8] [--only 1,2] [--save parts.npz] [--damp 1] [--scale 1] [--floor 32,17] [--uniform 64,33]

Measure it on the calibration text, so that both evaluation texts stay unseen. Slow: 61 forward passes
per window (~90 s per window on 2 cores). Results and their use are in BENCHMARKS.md ("Layer allocation").
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.realkv as rk  # noqa: E402
from kvmesh.codecs.cachegen import quant  # noqa: E402
from kvmesh.codecs.cachegen.levels import LEVELS, REFERENCE_LAYERS  # noqa: E402


def sensitivity(method: str, source: str, n_windows: int, files: str | None = None,
                save: str | None = None, only: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """(float [2, layers]: mean KL with only that (K/V, layer) decoded, the mean KL with all decoded).
    files: a model-files root; the codec is then ``method`` (a plain method name) with the model's files.
    save: an .npz rewritten after every window with the means so far (a long run can be stopped early).
    only: measure just these of the ``n_windows`` evenly spaced windows (to spread one measurement over
    processes; average the saved parts weighted by their "windows")."""
    if files:
        from kvmesh.codecs import get_codec
        from kvmesh.codecs.model_files import find_model_files
        from kvmesh.engine.calibrate import BUILTIN_MODEL

        found = find_model_files(BUILTIN_MODEL, [files])
        if found is None:
            raise SystemExit(f"no model files for {BUILTIN_MODEL} under {files}")
        codec = get_codec(method, backend="cpu", **found.codec_options(method))
    else:
        codec = rk.make_codec(method, "cpu")
    parts: np.ndarray | None = None
    whole = 0.0
    # several sources (comma-separated) are measured alike and averaged window by window: a schedule meant
    # for every kind of text is derived from a mix (recipe v4: calibration prose + validation code + fiction)
    chosen = [w for src in source.split(",")
              for j, w in enumerate(rk.windows(src, n_windows)) if only is None or j in only]
    n_windows = len(chosen)
    for i, window in enumerate(chosen):
        t0 = time.perf_counter()
        rec = rk._window_record(window)
        ctx = rec["kv"][:, :, :rk.CONTEXT_TOKENS].float()
        writer = getattr(codec, "for_chunk", lambda _start: codec)  # a sequence's first chunk as the agent writes it
        decoded = torch.cat([codec.decode(writer(s).encode(ctx[:, :, s:s + rk.CHUNK_TOKENS].half().contiguous())).float()
                             for s in range(0, rk.CONTEXT_TOKENS, rk.CHUNK_TOKENS)], dim=2)
        cont = rec["tokens"][rk.CONTEXT_TOKENS:rk.CONTEXT_TOKENS + rk.CONTINUATION_TOKENS]
        ref = torch.log_softmax(rk._continue(ctx, cont), dim=-1)
        p = ref.exp()

        def kl(kv: torch.Tensor) -> float:
            out = torch.log_softmax(rk._continue(kv, cont), dim=-1)
            return float((p * (ref - out)).sum(dim=-1).mean())

        if parts is None:
            parts = np.zeros((2, ctx.shape[1]))
        whole += kl(decoded) / n_windows
        for kv in (0, 1):
            for layer in range(ctx.shape[1]):
                mixed = ctx.clone()
                mixed[kv, layer] = decoded[kv, layer]
                parts[kv, layer] += kl(mixed) / n_windows
        print(f"window {i + 1}/{n_windows}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if save:
            np.savez(save, parts=parts * n_windows / (i + 1), whole=whole * n_windows / (i + 1), windows=i + 1)
    assert parts is not None
    return parts, whole


def allocate(parts: np.ndarray, levels: np.ndarray, modes: tuple[int, int], damp: float = 1.0,
             scale: float = 1.0, floor: tuple[int, int] = (4, 5)) -> np.ndarray:
    """int [2, layers]: level counts B with B - 1 = (``levels`` - 1) * scale * 2^(damp/2 log2(a / geomean(a)))
    rounded, floor[kv] <= B <= 256; B - 1 even where the half's mode is per-token symmetric."""
    a = np.maximum(parts, 1e-12)
    steps = (levels - 1) * scale * 2.0 ** (0.5 * damp * np.log2(a / np.exp(np.log(a).mean())))
    out = np.round(steps) + 1
    for kv in (0, 1):
        if modes[kv] == quant.MODE_TOKEN_SYMMETRIC:
            out[kv] = 2 * np.round(steps[kv] / 2) + 1
        out[kv] = np.clip(out[kv], floor[kv], 255 if modes[kv] == quant.MODE_TOKEN_SYMMETRIC else 256)
    return out.astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--method", default="cachegen-hq+qp+lp", help="a bench/realkv.py method name")
    parser.add_argument("--source", default="calibration",
                        help=f"a source or comma-separated sources of bench/realkv.py ({', '.join(rk.SOURCES)}); never "
                             "an evaluation text of bench/model_files_quality.py")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--damp", type=float, default=1.0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--floor", default="4,5", help="the fewest levels a K, V layer gets")
    parser.add_argument("--uniform", help="K,V: measure at these level counts in every layer instead of the "
                        "level's own (cachegen-hq's table came from --uniform 64,33)")
    parser.add_argument("--save", help="write the measured KL parts to this .npz (after every window)")
    parser.add_argument("--only", help="comma-separated indices: measure only these of the --windows windows")
    parser.add_argument("--files", help="a model-files root: measure METHOD (a plain method name) with the model's "
                                        "files from there instead of bench/realkv.py's +qp/+lp")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(rk.MAX_THREADS, torch.get_num_threads())))
    level = args.method.split("+")[0].removeprefix("cachegen").removeprefix("-") or "default"
    if args.uniform:
        k, v = (int(n) for n in args.uniform.split(","))
        LEVELS[level] = dataclasses.replace(LEVELS[level], key_levels=(k,) * REFERENCE_LAYERS,
                                            value_levels=(v,) * REFERENCE_LAYERS)
    for src in args.source.split(","):
        if src not in rk.SOURCES:
            parser.error(f"unknown source {src!r}; valid: {', '.join(rk.SOURCES)}")
    only = [int(i) for i in args.only.split(",")] if args.only else None
    parts, whole = sensitivity(args.method, args.source, args.windows, args.files, args.save, only)
    base = LEVELS[level].levels_for(parts.shape[1])
    if args.files and not args.uniform:  # the counts measured are the files' schedule, when they hold one
        from kvmesh.codecs.model_files import find_model_files
        from kvmesh.engine.calibrate import BUILTIN_MODEL

        found = find_model_files(BUILTIN_MODEL, [args.files])
        opts = found.codec_options(args.method) if found is not None else {}
        if "schedule" in opts:
            base = np.asarray(opts["schedule"][:2], dtype=np.int64)
    new = allocate(parts, base, (LEVELS[level].key_mode, LEVELS[level].value_mode), args.damp, args.scale,
                   tuple(int(v) for v in args.floor.split(",")))
    print(f"\n{len(only) if only else args.windows} windows each of {args.source}, {args.method}: KL with everything decoded {whole * 1e3:.3f}e-3, "
          f"sum of the per-layer parts {parts.sum() * 1e3:.3f}e-3")
    print(f"predicted KL at the allocation below: x{float((parts * ((base - 1) / (new - 1)) ** 2).sum() / parts.sum()):.2f} "
          f"(damp {args.damp}, scale {args.scale}, mean bits shift {float(np.log2((new - 1) / (base - 1)).mean()):+.3f})\n")
    print("| layer | K KL (1e-6) | V KL (1e-6) | K levels | V levels |\n| ---: | ---: | ---: | ---: | ---: |")
    for layer in range(parts.shape[1]):
        print(f"| {layer} | {parts[0, layer] * 1e6:.1f} | {parts[1, layer] * 1e6:.1f} | "
              f"{base[0, layer]} -> {new[0, layer]} | {base[1, layer]} -> {new[1, layer]} |")
    if parts.shape[1] == REFERENCE_LAYERS:
        print(f"\nkey_levels={tuple(int(v) for v in new[0])}\nvalue_levels={tuple(int(v) for v in new[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
