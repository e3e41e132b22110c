"""Single-core CPU speed of cachegen with and without the model files, on the committed real chunk.

    python bench/cpu_speed.py [--passes 5] [--methods cachegen,cachegen+qp,cachegen+lp,cachegen+qp+lp] [--profile]
    python bench/cpu_speed.py --baseline DIR [--passes 15]   # A/B against another build, interleaved
    python bench/cpu_speed.py --breakdown [--methods cachegen+qp+lp] [--passes 20]   # where each ms goes

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
        (native, "predict_parts", "cross-layer prediction (C, fp32 unfused)"),
        (native, "layer_residual", "residual and its spans (C)"),
        (backends, "levels_from_spans", "residual level count (quantile)"),
        (native, "quantize_layer", "quantize + key rounding + dequantize a layer (C)"),
        (cpu, "stream_models", "stream centers, tables, delta choice (C)"),
        (cpu, "rans_encode", "rANS encode (C)"),
        (cpu, "rans_decode", "rANS decode (C)"),
        (codec, "pack_side", "zlib of side sections"),
        (codec, "pack_meta", "zlib of stream meta"),
        (codec, "unpack_side", "inflate side sections"),
        (codec, "unpack_meta", "inflate stream meta"),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--methods", default="cachegen,cachegen+qp,cachegen+lp,cachegen+qp+lp")
    ap.add_argument("--profile", action="store_true", help="cProfile one encode and one decode of each method")
    ap.add_argument("--baseline", help="a built kvmesh tree (its lib folder) to A/B against, interleaved")
    ap.add_argument("--breakdown", action="store_true", help="each stage's share of an encode and a decode")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.methods.split(","))
    if args.baseline:
        return ab(args.methods.split(","), args.baseline, args.passes)
    if args.breakdown:
        return breakdown(args.methods.split(","), args.passes)
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
