"""The remote tier through a real Redis: chunks/s and MB/s, put by one agent and got by another,
raw (``remote_serde: naive``) vs encoded (``remote_serde: cachegen``).

    python bench/bench_remote.py [--chunks 16] [--repeats 3] [--methods naive,cachegen,int8] [--torch-threads 1]

Starts a private ``redis-server`` (the repository's .tools/bin, else PATH) on a free loopback port
with no persistence, and two agents (in this process, each with its own Redis connection pool):
agent A stores ``--chunks`` 256-token chunks of SmolLM2-135M's real KV (bench/data, fp16
[2, 30, 256, 192], 5.9 MB each) into ``RemoteBackend``; agent B, which has never seen them, looks
them up and reads them back decoded (its engine's path on a local miss). Put includes encoding
with the serde's codec, get includes decoding; MB/s are of raw fp16 KV. Best of ``--repeats``
(each repeat on fresh keys). Prints one markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmesh.instance_agent.agent import InstanceAgent  # noqa: E402
from kvmesh.instance_agent.config import AgentConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHUNK = 256
REMOTE = "RemoteBackend"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server", path=str(REPO / ".tools" / "bin")) or shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found (scripts/setup.sh puts one in .tools/bin)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return proc, f"redis://127.0.0.1:{port}"
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not answer PING")


def real_chunk() -> torch.Tensor:
    path = REPO / "bench" / "data" / "realkv_chunks.safetensors"
    if path.exists():
        from safetensors.torch import load_file

        return load_file(str(path))["chunk_0"]
    print(f"({path} missing: random KV, so cachegen's ratio is not representative)", file=sys.stderr)
    return torch.randn(2, 30, CHUNK, 192).to(torch.float16)


def agent(url: str, serde: str, name: str) -> InstanceAgent:
    cfg = AgentConfig(chunk_size=CHUNK, max_local_cpu_size=0.01, remote_url=url, remote_serde=serde,
                      lmcache_instance_id=name, lmcache_worker_ports=[0],
                      extra_config={"remote_key_prefix": "bench:", "remote_write_through": False})
    return InstanceAgent(cfg, metrics_port=-1)


async def one(url: str, serde: str, kv: torch.Tensor, n: int, repeats: int) -> dict[str, float]:
    a, b = agent(url, serde, "writer"), agent(url, serde, "reader")
    await a.start()
    await b.start()
    best = {"put": float("inf"), "get": float("inf")}
    stored = 0
    try:
        for r in range(repeats):
            # Fresh keys each repeat: n chunks of one sequence.
            tokens = [r * 10_000_000 + i for i in range(n * CHUNK)]
            seq = kv.repeat(1, 1, n, 1)
            t0 = time.perf_counter()
            assert await a.store(tokens, seq, REMOTE) == len(tokens)
            best["put"] = min(best["put"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            found, got = await b.retrieve(tokens)  # B's locations miss: the remote store serves
            best["get"] = min(best["get"], time.perf_counter() - t0)
            assert found == len(tokens) and got is not None and got.shape == seq.shape
            stats = (await b.stats()).locations
            stored = next(x for x in stats if x.name == REMOTE).used_bytes
            await a.clear(REMOTE)
    finally:
        await a.stop(grace=0)
        await b.stop(grace=0)
    raw = kv.numel() * kv.element_size() * n
    return {"put_s": best["put"], "get_s": best["get"], "raw_mb": raw / 1e6, "stored_mb": stored / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="naive,cachegen,int8")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the agent's codec pool already runs chunks in "
                        "parallel, and more threads per op oversubscribe a small or busy machine)")
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)
    kv = real_chunk()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_redis(Path(tmp))
        try:
            rows = [(m, asyncio.run(one(url, m, kv, args.chunks, args.repeats))) for m in args.methods.split(",")]
        finally:
            proc.terminate()
            proc.wait(10)
    n = args.chunks
    print(f"\n{n} chunks of [2, 30, 256, 192] fp16 ({kv.numel() * 2 / 1e6:.1f} MB raw each), writer agent A -> "
          f"Redis -> reader agent B; best of {args.repeats}; MB/s of raw KV; torch threads {args.torch_threads}\n")
    print("| remote_serde | stored MB | ratio | put chunks/s | put MB/s | get chunks/s | get MB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m, r in rows:
        print(f"| {m} | {r['stored_mb']:.1f} | {r['raw_mb'] / max(r['stored_mb'], 1e-9):.2f}x | {n / r['put_s']:.1f} | "
              f"{r['raw_mb'] / r['put_s']:.0f} | {n / r['get_s']:.1f} | {r['raw_mb'] / r['get_s']:.0f} |")


if __name__ == "__main__":
    main()
