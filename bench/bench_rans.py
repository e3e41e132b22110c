"""Throughput of the numpy rANS reference (codecs/cachegen/rans.py) on one core.

    python bench/bench_rans.py [--streams 11520] [--symbols 256] [--alphabet 32] [--repeats 3]

Prints MB/s of fp16 input (2 bytes per symbol: one symbol per fp16 element) for encode and decode.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from kvmesh.codecs.cachegen import rans


def _tables(rng: np.random.Generator, nt: int, a: int) -> np.ndarray:
    # Laplace-like tables around the alphabet's centre, like quantized KV residuals.
    centre = (a - 1) / 2
    freq = np.empty((nt, a), dtype=np.int64)
    for t in range(nt):
        w = np.exp(-np.abs(np.arange(a) - centre) / (0.5 + t))
        f = np.maximum(1, np.floor(w / w.sum() * (rans.M - a))).astype(np.int64)
        f[np.argmax(f)] += rans.M - f.sum()
        freq[t] = f
    return freq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=11520)
    ap.add_argument("--symbols", type=int, default=256)
    ap.add_argument("--alphabet", type=int, default=32)
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    freq = _tables(rng, args.tables, args.alphabet)
    cum, s2s = rans.build_tables(freq)
    tidx = rng.integers(0, args.tables, args.streams)
    # Draw each stream's symbols from its own table so the coded size is realistic.
    u = rng.integers(0, rans.M, (args.streams, args.symbols))
    sym = s2s[tidx[:, None], u].astype(np.uint8)
    lengths = np.full(args.streams, args.symbols, dtype=np.int32)
    mb = args.streams * args.symbols * 2 / 1e6
    enc = dec = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        words, counts = rans.encode(sym, lengths, tidx, freq, cum)
        t1 = time.perf_counter()
        back = rans.decode(words, counts, lengths, tidx, freq, cum, s2s, args.symbols)
        t2 = time.perf_counter()
        enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
    if not np.array_equal(back, sym):
        raise SystemExit("round trip mismatch")
    bits = words.size * 16 / sym.size
    print(f"streams={args.streams} symbols={args.symbols} alphabet={args.alphabet} tables={args.tables} "
          f"bits/symbol={bits:.3f}")
    print("| stage | ms | MB/s of fp16 input |")
    print("| --- | --- | --- |")
    print(f"| rans encode | {enc * 1e3:.1f} | {mb / enc:.0f} |")
    print(f"| rans decode | {dec * 1e3:.1f} | {mb / dec:.0f} |")


if __name__ == "__main__":
    main()
