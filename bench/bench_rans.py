"""Throughput of the numpy rANS reference (codecs/cachegen/rans.py) on one core.

    python bench/bench_rans.py [--streams 11520] [--symbols 256] [--alphabet 32] [--repeats 3]

Prints MB/s of fp16 input (2 bytes per symbol: one symbol per fp16 element) for encode and decode.
"""
from __future__ import annotations

import argparse
import os
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
    enc = dec = enc_cpu = dec_cpu = float("inf")
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        words, counts = rans.encode(sym, lengths, tidx, freq, cum)
        t1, c1 = time.perf_counter(), time.process_time()
        back = rans.decode(words, counts, lengths, tidx, freq, cum, s2s, args.symbols)
        t2, c2 = time.perf_counter(), time.process_time()
        enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
        enc_cpu, dec_cpu = min(enc_cpu, c1 - c0), min(dec_cpu, c2 - c1)
    if not np.array_equal(back, sym):
        raise SystemExit("round trip mismatch")
    bits = words.size * 16 / sym.size
    print(f"streams={args.streams} symbols={args.symbols} alphabet={args.alphabet} tables={args.tables} "
          f"bits/symbol={bits:.3f}")
    # CPU time as well as wall time: on a shared machine the process may get only part of a core.
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("| stage | wall ms | MB/s of fp16 input (wall) | CPU ms | MB/s per core (CPU time) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| rans encode | {enc * 1e3:.1f} | {mb / enc:.0f} | {enc_cpu * 1e3:.1f} | {mb / enc_cpu:.0f} |")
    print(f"| rans decode | {dec * 1e3:.1f} | {mb / dec:.0f} | {dec_cpu * 1e3:.1f} | {mb / dec_cpu:.0f} |")


if __name__ == "__main__":
    main()
