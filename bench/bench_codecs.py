"""Codec benchmark on real KV (issue 3's setup): size, where the bytes go, quality, CPU speed.

    python bench/bench_codecs.py [--source botchan|heldout|both] [--windows 8] [--methods a,b] [--speed-chunks 4]
    python bench/bench_codecs.py --speed-only [--methods cachegen,cachegen-hq]   # ~1 minute

A method name ending in ``+qp`` (``cachegen+qp``) is that codec with SmolLM2's query profile measured
on a third text (bench/realkv.py ``query_profile``): its keys are rounded along the model's queries.
``+lp`` (``cachegen+lp``, ``cachegen+qp+lp``) adds SmolLM2's layer predictor fitted on that third text
(``layer_predictor``): each layer is coded as its residual from a prediction made of the layers before.

Per method and level it prints one markdown row: bytes per 256-token chunk, ratio vs fp16, bits per
element, NLL change and top-1 agreement (bench/realkv.py's evaluation: 1,024 context tokens replaced
by the codec's round trip, 256 continuation tokens), and single-thread CPU encode/decode MB/s of fp16
input (torch.set_num_threads(1), best of 3 over real chunks). A second table shows where the bytes
go, by container section, averaged over the real chunks.

--speed-only skips the quality evaluation (the model only computes the real chunks) and prints the
CPU speed alone (best of 5), of the compiled extension (the CPU's only implementation).
bench/cpu_speed.py measures the same without the model (the committed chunk, stand-in model files).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.realkv as realkv  # noqa: E402
from kvmesh.codecs import container  # noqa: E402

METHODS = ["cachegen", "cachegen-hq", "lmcache-cachegen", "int4", "fp8", "int8", "lossless"]
SECTION_NAMES = {
    1: ("mode", "data"),
    2: ("params", "lead token", "key side", "value side", "stream meta", "stream lengths", "symbols", "protected rows"),
    3: ("scales", "symbols"),
    4: ("scales", "symbols"),
    5: ("scales", "symbols"),
    6: ("scales", "CDFs", "stream lengths", "symbols"),
}


def where_bytes_go(name: str, chunks: list[torch.Tensor]) -> dict[str, float]:
    """Mean bytes per chunk by container section (plus 'header': fixed header, section table, CRC)."""
    codec = realkv.make_codec(name)
    totals: dict[str, float] = {}
    for chunk in chunks:
        blob = codec.encode(chunk)
        header, sections = container.unpack(blob)
        names = SECTION_NAMES.get(header.codec_id, tuple(f"s{i}" for i in range(len(sections))))
        for n, s in zip(names, sections):
            totals[n] = totals.get(n, 0.0) + len(s)
        totals["header"] = totals.get("header", 0.0) + len(blob) - sum(len(s) for s in sections)
    return {k: v / len(chunks) for k, v in totals.items()}


def cpu_speed(name: str, chunks: list[torch.Tensor], passes: int = 3) -> tuple[float, float]:
    """Single-thread encode and decode MB/s of fp16 input (best of `passes` passes over the chunks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codec = realkv.make_codec(name)
        raw = sum(c.numel() * c.element_size() for c in chunks)
        blobs = [codec.encode(c) for c in chunks]  # warm-up (table caches)
        enc = dec = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            blobs = [codec.encode(c) for c in chunks]
            enc = min(enc, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for b in blobs:
                codec.decode(b)
            dec = min(dec, time.perf_counter() - t0)
        return raw / 1e6 / enc, raw / 1e6 / dec
    finally:
        torch.set_num_threads(threads)


def speed_table(methods: list[str], chunks: list[torch.Tensor]) -> None:
    """CPU speed only (the compiled extension: the CPU's one implementation)."""
    mb = sum(c.numel() * c.element_size() for c in chunks) / 1e6 / len(chunks)
    print(f"single-thread CPU speed, {len(chunks)} real chunks of {mb:.1f} MB fp16; best of 5 passes\n")
    print("| method | encode MB/s | decode MB/s | encode ms/chunk | decode ms/chunk |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for m in methods:
        enc, dec = cpu_speed(m, chunks, passes=5)
        print(f"| {m} | {enc:.1f} | {dec:.1f} | {1e3 * mb / enc:.1f} | {1e3 * mb / dec:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="botchan", choices=["botchan", "heldout", "both"])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--speed-chunks", type=int, default=4, help="real chunks timed for CPU MB/s (0: skip)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the CPU speed table (compiled vs numpy rANS coder for cachegen), no quality evaluation")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if args.speed_only:
        n = max(args.speed_chunks, 1)
        speed_table(methods, list(realkv.chunks("botchan", n=n))[:n])
        return 0
    sources = ["botchan", "heldout"] if args.source == "both" else [args.source]
    chunks = list(realkv.chunks("botchan", n=max(args.speed_chunks, 4)))

    print(f"machine: {torch.get_num_threads()} torch threads for the model, codec speed single-thread; "
          f"torch {torch.__version__}")
    for source in sources:
        print(f"\n### {source}: {args.windows} windows x 6 chunks [2, 30, 256, 192] fp16\n")
        print("| method | bytes/chunk | ratio vs fp16 | bits/element | NLL change (nats) | top-1 agreement "
              "| rel. err K / V | CPU encode MB/s | CPU decode MB/s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for m in methods:
            r = realkv.evaluate_codec(m, source=source, n_windows=args.windows)
            enc, dec = cpu_speed(m, chunks[: args.speed_chunks]) if args.speed_chunks else (float("nan"),) * 2
            speed = f"| {enc:.1f} | {dec:.1f} |" if args.speed_chunks else "| — | — |"  # --speed-chunks 0: not timed
            print(f"| {m} | {r['bytes_per_chunk']:,.0f} | {r['ratio']:.2f}x | {r['bits_per_element']:.3f} "
                  f"| {r['nll_delta']:+.4f} | {100 * r['top1']:.1f}% | {r['rel_err_k']:.3f} / {r['rel_err_v']:.3f} "
                  f"{speed}", flush=True)

    print("\n### where the bytes go (mean bytes per chunk, botchan chunks)\n")
    print("| method | sections |")
    print("| --- | --- |")
    for m in methods:
        parts = where_bytes_go(m, chunks[:4])
        total = sum(parts.values())
        desc = ", ".join(f"{k} {v:,.0f} ({100 * v / total:.1f}%)" for k, v in parts.items() if v)
        print(f"| {m} | {desc} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
