"""Single-core CPU speed of cachegen with and without the model files, on the committed real chunk.

    python bench/cpu_speed.py [--passes 5] [--methods cachegen,cachegen+qp,cachegen+lp,cachegen+qp+lp] [--profile]

Needs no model: the chunk is bench/data/realkv_chunks.safetensors' chunk_0 (SmolLM2-135M, [2, 30, 256,
192] fp16), the layer predictor is fitted on that file's two chunks (predict.fit) and the query
profile is made of the keys' own second moments per (layer, KV head): the same shapes and the same work
per chunk as the model's files, so the speeds are those of the real files (bench_codecs.py measures
with them, but needs the model). Prints a table (best of --passes, MB/s of fp16 input a core).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvmesh.codecs import LayerPredictor, QueryProfile, get_codec  # noqa: E402
from kvmesh.codecs.cachegen.predict import fit  # noqa: E402

CHUNKS = REPO / "bench" / "data" / "realkv_chunks.safetensors"
HEAD_DIM = 64


def load_chunks() -> list[torch.Tensor]:
    from safetensors.torch import load_file

    d = load_file(str(CHUNKS))
    return [d["chunk_0"], d["chunk_1"]]


def key_profile(kv: torch.Tensor) -> QueryProfile:
    """A stand-in query profile: the keys' second moments per (layer, KV head)."""
    k = kv[0].double()  # [L, T, C]
    L, T, C = k.shape
    h = k.reshape(L, T, C // HEAD_DIM, HEAD_DIM).permute(0, 2, 1, 3)  # [L, H, T, D]
    return QueryProfile((h.transpose(2, 3) @ h / T).numpy())


def codecs(methods: list[str], chunks: list[torch.Tensor]) -> dict[str, object]:
    profile = key_profile(chunks[0])
    predictor: LayerPredictor | None = None
    out = {}
    for m in methods:
        name, *suffixes = m.split("+")
        opts: dict[str, object] = {}
        if "qp" in suffixes:
            opts["key_profile"] = profile
        if "lp" in suffixes:
            predictor = predictor or fit(chunks)
            opts["predictor"] = predictor
        out[m] = get_codec(name, backend="cpu", **opts)
    return out


def best(fn, passes: int) -> float:
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--methods", default="cachegen,cachegen+qp,cachegen+lp,cachegen+qp+lp")
    ap.add_argument("--profile", action="store_true", help="cProfile one encode and one decode of each method")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    chunks = load_chunks()
    chunk = chunks[0]
    mb = chunk.numel() * 2 / 1e6
    table = codecs(args.methods.split(","), chunks)
    print(f"one core, chunk {tuple(chunk.shape)} fp16 = {mb:.2f} MB, best of {args.passes}")
    print("| method | bytes | ratio | encode MB/s | decode MB/s | encode ms | decode ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, codec in table.items():
        blob = codec.encode(chunk)
        codec.decode(blob)
        te = best(lambda: codec.encode(chunk), args.passes)
        td = best(lambda: codec.decode(blob), args.passes)
        print(f"| {name} | {len(blob)} | {chunk.numel() * 2 / len(blob):.2f}x | {mb / te:.1f} | {mb / td:.1f} "
              f"| {te * 1e3:.1f} | {td * 1e3:.1f} |", flush=True)
        if args.profile:
            for what, fn in (("encode", lambda: codec.encode(chunk)), ("decode", lambda: codec.decode(blob))):
                prof = cProfile.Profile()
                prof.runcall(fn)
                print(f"-- {name} {what}")
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
