"""Single-core CPU speed of cachegen with and without the model files, on the committed real chunk.

    python bench/cpu_speed.py [--passes 5] [--methods cachegen,cachegen+qp,cachegen+lp,cachegen+qp+lp] [--profile]
    python bench/cpu_speed.py --baseline DIR [--passes 15]   # A/B against another build, interleaved

--baseline DIR: DIR is a built kvmesh tree of another commit (``git archive <commit> | tar -x -C /tmp/base;
cd /tmp/base; python setup.py build``: DIR = /tmp/base/build/lib.<platform>). Two worker processes, one
per build, run one encode and one decode each in turn, pass after pass, so both see the same machine
load (this machine is shared); the table gives each one's best and the ratio new / baseline.

Needs no model: the chunk is bench/data/realkv_chunks.safetensors' chunk_0 (SmolLM2-135M, [2, 30, 256,
192] fp16), the layer predictor is fitted on that file's two chunks (predict.fit) and the query
profile is made of the keys' own second moments per (layer, KV head): the same shapes and the same work
per chunk as the model's files, so the speeds are those of the real files (bench_codecs.py measures
with them, but needs the model). Prints a table (best of --passes, MB/s of fp16 input a core).
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import sys
import time
from pathlib import Path

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
    import os
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--methods", default="cachegen,cachegen+qp,cachegen+lp,cachegen+qp+lp")
    ap.add_argument("--profile", action="store_true", help="cProfile one encode and one decode of each method")
    ap.add_argument("--baseline", help="a built kvmesh tree (its lib folder) to A/B against, interleaved")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.methods.split(","))
    if args.baseline:
        return ab(args.methods.split(","), args.baseline, args.passes)
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
