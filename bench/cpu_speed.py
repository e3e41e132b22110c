"""Single-core CPU speed of cachegen with and without the model files, on the committed real chunk.

    python bench/cpu_speed.py [--passes 5] [--methods cachegen,cachegen+qp,cachegen+lp,cachegen+qp+lp] [--profile]
    python bench/cpu_speed.py --baseline DIR [--passes 15]   # A/B against another build, interleaved
    python bench/cpu_speed.py --breakdown [--methods cachegen+qp+lp] [--passes 20]   # where each ms goes
    python bench/cpu_speed.py --integer-estimate   # what integer prediction would cost (needs gcc, AVX512-VNNI)

--baseline DIR: DIR is a built kvmesh tree of another commit (``git archive <commit> | tar -x -C /tmp/base;
cd /tmp/base; python setup.py build``: DIR = /tmp/base/build/lib.<platform>). Two worker processes, one
per build, run one encode and one decode each in turn, pass after pass, so both see the same machine
load (this machine is shared); the table gives each one's best and the ratio new / baseline.

Needs no model: the chunk is bench/data/realkv_chunks.safetensors' chunk_0 (SmolLM2-135M, [2, 30, 256,
192] fp16), the layer predictor is fitted on that file's two chunks (predict.fit) and the query
profile is made of the keys' own second moments per (layer, KV head): the same shapes and the same work
per chunk as the model's files, so the speeds are those of the real files (bench_codecs.py measures
with them, but needs the model). Prints a table (best of --passes, MB/s of fp16 input a core).

--breakdown: the encode and decode of a chunk stage by stage: each stage's own CPU time (its callees'
taken out), the best of --passes per stage, so the table says where every millisecond goes.

--integer-estimate: the fp32 prediction (containers before 2026-12-03) rounds every product before its
sum, which no CPU runs faster than one multiply and one add per term (16 terms a cycle with AVX-512
here). It times that (predict.c) and the format's fixed-point prediction (predict.c's predict_fixed,
int16 features and weights, written since 2026-12-03) against bare integer dot products of the same
shapes (int16 x int16 and uint8 x int8 into int32, AVX512-VNNI, the same 6 x 64 register blocking),
compiled here with gcc from the source below: the floor each arithmetic could reach.

BLAS runs on one thread (OPENBLAS_NUM_THREADS=1): fitting the stand-in predictor must not leave
OpenBLAS threads spinning on the other core while the codec is timed.
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads BLAS (see the docstring)

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


# The thread's CPU time, not the wall clock: "MB/s a core", and far steadier on a shared machine.
clock = time.thread_time


def best(fn, passes: int) -> float:
    times = []
    for _ in range(passes):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)


def worker(methods: list[str]) -> int:
    """Reads a method name per line; answers 'encode_s decode_s sha256-prefix' for one encode and one decode."""
    torch.set_num_threads(1)
    chunks = load_chunks()
    table = codecs(methods, chunks)
    blobs = {m: c.encode(chunks[0]) for m, c in table.items()}
    for m, c in table.items():
        c.decode(blobs[m])
    print("ready", flush=True)
    for line in sys.stdin:
        m = line.strip()
        t = clock()
        blobs[m] = table[m].encode(chunks[0])
        te = clock() - t
        t = clock()
        table[m].decode(blobs[m])
        td = clock() - t
        print(f"{te} {td} {hashlib.sha256(blobs[m]).hexdigest()[:16]}", flush=True)
    return 0


def ab(methods: list[str], baseline: str, passes: int) -> int:
    import subprocess

    def start(pythonpath: str | None) -> subprocess.Popen:
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        else:
            env.pop("PYTHONPATH", None)
        proc = subprocess.Popen([sys.executable, __file__, "--worker", "--methods", ",".join(methods)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a worker failed to start")
        return proc

    workers = {"baseline": start(baseline), "new": start(None)}
    best: dict[tuple[str, str], list] = {(w, m): [float("inf"), float("inf"), ""] for w in workers for m in methods}
    for _ in range(passes):
        for m in methods:
            for w, proc in workers.items():
                proc.stdin.write(m + "\n")
                proc.stdin.flush()
                te, td, n = proc.stdout.readline().split()
                b = best[w, m]
                b[0], b[1], b[2] = min(b[0], float(te)), min(b[1], float(td)), n
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    mb = load_chunks()[0].numel() * 2 / 1e6
    print(f"one core, {mb:.2f} MB fp16 chunk, best of {passes} interleaved passes; baseline = {baseline}")
    print("| method | baseline encode MB/s | new encode MB/s | ratio | baseline decode MB/s | new decode MB/s | ratio | same bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in methods:
        (be, bd, bn), (ne, nd, nn) = best["baseline", m], best["new", m]
        print(f"| {m} | {mb / be:.1f} | {mb / ne:.1f} | {be / ne:.2f}x | {mb / bd:.1f} | {mb / nd:.1f} | {bd / nd:.2f}x "
              f"| {'yes' if bn == nn else f'no: {bn} vs {nn}'} |")
    return 0


# (object, attribute, label) of every stage --breakdown times; nested stages' time is taken out of
# their callers', so the rows add up to the whole encode or decode.
def _stages() -> list[tuple[object, str, str]]:
    from kvmesh.codecs import container
    from kvmesh.codecs.cachegen import backends, codec, native, predict

    cpu = backends.CpuBackend
    return [
        (codec.CacheGenCodec, "encode", "encode: checks, casts, section assembly (codec.py)"),
        (codec.CacheGenCodec, "decode", "decode: checks, casts, section parsing (codec.py)"),
        (cpu, "quantize", "quantize without prediction / the lead token"),
        (cpu, "dequantize", "dequantize (decode)"),
        (codec, "_protect_encode", "protected rows: selection, 8-bit copy"),
        (codec, "_protect_decode", "protected rows (decode)"),
        (native, "row_sums", "protected rows: exact row sums (C)"),
        (cpu, "quantize_predicted", "prediction loop: Python glue"),
        (cpu, "add_predictions", "prediction loop: Python glue (decode)"),
        (native, "predict_parts", "cross-layer prediction (C, fp32 unfused: containers before 2026-12-03)"),
        (native, "predict_fixed", "cross-layer prediction (C, fixed-point)"),
        (native, "to_fixed", "decoded layers to fixed-point features (C)"),
        (native, "layer_residual", "residual and its spans (C)"),
        (backends, "levels_from_spans", "residual level count (quantile)"),
        (native, "quantize_layer", "quantize + key rounding + dequantize a layer (C)"),
        (cpu, "stream_models", "stream centers, tables, delta choice (C)"),
        (cpu, "rans_encode", "rANS encode (C)"),
        (cpu, "rans_decode", "rANS decode (C)"),
        (codec, "pack_side", "side sections 1-3, coded (C)"),
        (codec, "pack_meta", "stream meta, coded (C)"),
        (codec, "unpack_side", "side sections 1-3 read (C; zlib if old)"),
        (codec, "unpack_meta", "stream meta read (C; zlib if old)"),
        (codec, "_tensors_from", "read side tensors"),
        (container, "pack", "container pack (CRC)"),
        (container, "unpack", "container unpack (CRC)"),
    ]


def breakdown(methods: list[str], passes: int) -> int:
    """Times each stage's own CPU time (callees excluded) over --passes encodes and decodes."""
    import functools

    torch.set_num_threads(1)
    chunks = load_chunks()
    chunk = chunks[0]
    mb = chunk.numel() * 2 / 1e6
    table = codecs(methods, chunks)
    spent: dict[str, float] = {}
    stack: list[float] = []  # per open stage, the time its callees took

    def timed(fn, label):
        @functools.wraps(fn)
        def run(*a, **k):
            stack.append(0.0)
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                total = clock() - t
                inner = stack.pop()
                spent[label] = spent.get(label, 0.0) + total - inner
                if stack:
                    stack[-1] += total
        return run

    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in _stages()]
    for (obj, name, label), (_, _, fn) in zip(_stages(), originals):
        setattr(obj, name, timed(fn, label))
    try:
        for m, codec in table.items():
            blob = codec.encode(chunk)
            for what, fn in (("encode", lambda: codec.encode(chunk)), ("decode", lambda: codec.decode(blob))):
                best: dict[str, float] = {}
                totals = []
                for _ in range(passes):
                    spent.clear()
                    t = clock()
                    fn()
                    totals.append(clock() - t)
                    for k, v in spent.items():
                        best[k] = min(best.get(k, v), v)
                total = min(totals)
                print(f"\n{m} {what}: best {total * 1e3:.1f} ms = {mb / total:.1f} MB/s a core "
                      f"(stages: best of {passes} each)")
                print("| stage | ms | share |")
                print("| --- | --- | --- |")
                for k, v in sorted(best.items(), key=lambda kv: -kv[1]):
                    if v >= 0.05e-3:
                        print(f"| {k} | {v * 1e3:.2f} | {v / total:.0%} |")
                print(f"| sum of the stages' bests | {sum(best.values()) * 1e3:.2f} | {sum(best.values()) / total:.0%} |")
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
    return 0


_INT_KERNELS = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
/* x [R, F] with NB-byte groups of features, w [F / G, C, G]: each int32 lane adds G products a step. */
#define KERNEL(NAME, XT, WT, G, DOT)                                                                    \
void NAME(const XT *x, int R, int F, int C, const WT *w, int32_t *out) {                               \
    for (int t = 0; t + 6 <= R; t += 6)                                                                 \
        for (int j = 0; j + 64 <= C; j += 64) {                                                         \
            __m512i a[6][4];                                                                            \
            for (int r = 0; r < 6; r++) for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_si512();   \
            for (int i = 0; i < F / G; i++) {                                                           \
                __m512i wv[4];                                                                          \
                for (int v = 0; v < 4; v++)                                                             \
                    wv[v] = _mm512_loadu_si512((const void *)(w + ((size_t)i * C + j + 16 * v) * G));   \
                for (int r = 0; r < 6; r++) {                                                           \
                    int32_t g;                                                                          \
                    memcpy(&g, x + (size_t)(t + r) * F + G * i, 4);                                     \
                    const __m512i xb = _mm512_set1_epi32(g);                                            \
                    for (int v = 0; v < 4; v++) a[r][v] = DOT(a[r][v], xb, wv[v]);                      \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < 6; r++) for (int v = 0; v < 4; v++)                                     \
                _mm512_storeu_si512((void *)(out + (size_t)(t + r) * C + j + 16 * v), a[r][v]);         \
        }                                                                                               \
}
KERNEL(pred_i16, int16_t, int16_t, 2, _mm512_dpwssd_epi32)
KERNEL(pred_u8, uint8_t, int8_t, 4, _mm512_dpbusd_epi32)
"""


def integer_estimate(passes: int) -> int:
    """Per-chunk cost of the fp32 and the fixed-point prediction against bare integer dot products of their shapes."""
    import ctypes
    import subprocess
    import tempfile

    import numpy as np

    from kvmesh.codecs.cachegen import native

    chunk = load_chunks()[0]
    _, L, T, C = chunk.shape
    R = (T - 1) // 6 * 6  # the rest tokens, whole 6-row blocks (the integer kernels have no row tail)
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp, "k.c"), Path(tmp, "k.so")
        src.write_text(_INT_KERNELS)
        subprocess.run(["gcc", "-O3", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-o", str(lib),
                        str(src)], check=True)
        k = ctypes.CDLL(str(lib))
        g = np.random.default_rng(0)
        ptr = ctypes.c_void_p
        print(f"one core, {L - 1} predicted layers x (K: {2 * C} features, V: {3 * C}) x {R} rows x {C} channels "
              f"per chunk, best of {passes}")
        print("| arithmetic | K layer ms | V layer ms | chunk encode ms (all layers) | vs fp32 |")
        print("| --- | --- | --- | --- | --- |")
        rows = {}
        from kvmesh.codecs import LayerPredictor

        stand_in = LayerPredictor(g.standard_normal((1, 2 * C, C)) / 30, np.zeros((1, C)),
                                  g.standard_normal((1, 3 * C, C)) / 30, np.zeros((1, C)))
        for name in ("fp32, products rounded, then summed (containers before 2026-12-03)",
                     "fixed-point, the format since 2026-12-03 (predict_fixed: int16, vpdpwssd, + scaling)",
                     "bare int16 x int16 -> int32 (vpdpwssd)", "bare uint8 x int8 -> int32 (vpdpbusd)"):
            ms = []
            for F in (2 * C, 3 * C):
                out32 = np.empty((R, C), np.int32)
                if name.startswith("fp32"):
                    x, w = g.random((R, F), np.float32), g.random((F, C), np.float32)
                    b, out = np.zeros(C, np.float32), np.empty((R, C), np.float32)
                    fn = lambda: native._ransc.predict(x, R, F, C, w, b, out)  # noqa: E731
                elif name.startswith("fixed"):
                    parts = tuple((g.integers(-32767, 32767, (R, C), np.int16), 10) for _ in range(F // C))
                    out = np.empty((R, C), np.float32)
                    kv = F // C - 2
                    fn = lambda: native.predict_fixed(parts, stand_in, kv, 1, out)  # noqa: E731
                elif name.startswith("bare int16"):
                    x, w = g.integers(-3000, 3000, (R, F), np.int16), g.integers(-3000, 3000, (F // 2, C, 2), np.int16)
                    fn = lambda: k.pred_i16(ptr(x.ctypes.data), R, F, C, ptr(w.ctypes.data), ptr(out32.ctypes.data))  # noqa: E731
                else:
                    x, w = g.integers(0, 255, (R, F), np.uint8), g.integers(-100, 100, (F // 4, C, 4), np.int8)
                    fn = lambda: k.pred_u8(ptr(x.ctypes.data), R, F, C, ptr(w.ctypes.data), ptr(out32.ctypes.data))  # noqa: E731
                fn()
                ms.append(best(fn, passes) * 1e3)
            rows[name] = ms
            total = (L - 1) * sum(ms)
            base = (L - 1) * sum(next(iter(rows.values())))
            print(f"| {name} | {ms[0]:.3f} | {ms[1]:.3f} | {total:.1f} | {base / total:.2f}x |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--methods", default="cachegen,cachegen+qp,cachegen+lp,cachegen+qp+lp")
    ap.add_argument("--profile", action="store_true", help="cProfile one encode and one decode of each method")
    ap.add_argument("--baseline", help="a built kvmesh tree (its lib folder) to A/B against, interleaved")
    ap.add_argument("--breakdown", action="store_true", help="each stage's share of an encode and a decode")
    ap.add_argument("--integer-estimate", action="store_true", help="fp32 prediction vs integer dot products")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.methods.split(","))
    if args.baseline:
        return ab(args.methods.split(","), args.baseline, args.passes)
    if args.breakdown:
        return breakdown(args.methods.split(","), args.passes)
    if args.integer_estimate:
        return integer_estimate(max(args.passes, 20))
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
