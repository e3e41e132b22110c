#!/usr/bin/env python3
"""Quality and time to first token in serving: greedy completions of the embedded engine's model
(SmolLM2-135M-Instruct, CPU) over prompts that share a long document prefix, from

- a fresh prefill (no cache),
- a cache hit on raw stored KV (float16 chunks in the agent),
- a cache hit on KV compressed with a codec through the agent's gRPC Compress (decoded on load),

with the real ``CompletionRunner`` and a real ``EmbeddedAgent`` (no HTTP, no controller: the same
code paths ``kvmesh-serve`` runs). Prints a markdown table; numbers go to BENCHMARKS.md.

    python bench/serving_quality.py [--questions 6] [--max-tokens 32] [--method cachegen] [--threads 2]

Agreement = generated tokens equal position by position (to the fresh prefill's, or to the raw
hit's: the same float16 KV before coding, which isolates the codec); "same prefix" = tokens before
the first difference. TTFT = request start to first token,
including the agent's load (and decode) of the cached prefix.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402
from kvmesh.core.channels import channel as mesh_channel  # noqa: E402
from kvmesh.engine.completion import CompletionRunner  # noqa: E402
from kvmesh.engine.model import load_model  # noqa: E402
from kvmesh.engine.sampling import SamplingParams  # noqa: E402
from kvmesh.instance_agent.agent import EmbeddedAgent  # noqa: E402
from kvmesh.instance_agent.config import config_from_dict  # noqa: E402
from tests.e2e.prompts import LONG_PROMPT  # noqa: E402

QUESTIONS = [
    "\n\nQuestion: What does a KV cache store?\nAnswer:",
    "\n\nQuestion: Why does compression of the cache matter?\nAnswer:",
    "\n\nQuestion: How are chunks addressed?\nAnswer:",
    "\n\nQuestion: What does the controller do?\nAnswer:",
    "\n\nQuestion: How is quality measured?\nAnswer:",
    "\n\nQuestion: What do operators watch?\nAnswer:",
    "\n\nSummarize the text above in one line:",
    "\n\nList three facts from the text above:\n1.",
]


def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(positions equal, length of the common prefix)."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same, prefix


def run_op(stub: agent_pb2_grpc.InstanceAgentStub, op: str, tokens: list[int], method: str) -> None:
    request = agent_pb2.CompressRequest if op == "compress" else agent_pb2.DecompressRequest
    call = stub.Compress if op == "compress" else stub.Decompress
    for _ in call(request(tokens=tokens, method=method, location="LocalCPUBackend"), timeout=600):
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--method", default="cachegen")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(torch.float32)
    config = config_from_dict({"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 2,
                               "lmcache_worker_ports": 0, "lmcache_instance_id": "bench"}, env={})
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    with EmbeddedAgent(config, worker_id=0, metrics_port=-1) as agent:
        cached_runner = CompletionRunner(model, tokenizer, agent, kv_dtype=torch.float16, max_model_len=8192)
        fresh_runner = CompletionRunner(model, tokenizer, None, kv_dtype=torch.float16, max_model_len=8192)
        channel = mesh_channel(f"localhost:{agent.grpc_port}", config.security)
        stub = agent_pb2_grpc.InstanceAgentStub(channel)
        fresh_runner.complete(fresh_runner.tokenize("warm up"), SamplingParams(max_tokens=2, temperature=0.0))
        for question in QUESTIONS[: args.questions]:
            tokens = cached_runner.tokenize(LONG_PROMPT + question)
            fresh = fresh_runner.complete(tokens, greedy)
            cached_runner.complete(tokens, SamplingParams(max_tokens=1, temperature=0.0))  # stores the chunks
            raw = cached_runner.complete(tokens, greedy)
            t0 = time.perf_counter()
            run_op(stub, "compress", tokens, args.method)
            compress_s = time.perf_counter() - t0
            coded = cached_runner.complete(tokens, greedy)
            run_op(stub, "decompress", tokens, "")
            rows.append({"tokens": len(tokens), "cached": coded.cached_tokens, "fresh": fresh, "raw": raw,
                         "coded": coded, "compress_s": compress_s})
        channel.close()

    n = args.max_tokens
    print(f"\nSmolLM2-135M-Instruct, float32 compute, float16 KV chunks of 256 tokens, greedy {n} tokens, "
          f"method {args.method}, torch threads {args.threads}\n")
    print("| prompt tokens | cached | TTFT fresh (s) | TTFT raw hit (s) | TTFT {m} hit (s) | raw vs fresh | "
          "{m} vs fresh | {m} vs raw | {m} same prefix vs raw |".format(m=args.method))
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        raw_same, _ = agreement(r["fresh"].output_tokens, r["raw"].output_tokens)
        cg_same, _ = agreement(r["fresh"].output_tokens, r["coded"].output_tokens)
        cg_raw, cg_prefix = agreement(r["raw"].output_tokens, r["coded"].output_tokens)
        print(f"| {r['tokens']} | {r['cached']} | {r['fresh'].ttft_s:.3f} | {r['raw'].ttft_s:.3f} | "
              f"{r['coded'].ttft_s:.3f} | {raw_same}/{n} | {cg_same}/{n} | {cg_raw}/{n} | {cg_prefix} |")
    total = n * len(rows)
    raw_all = sum(agreement(r["fresh"].output_tokens, r["raw"].output_tokens)[0] for r in rows)
    cg_all = sum(agreement(r["fresh"].output_tokens, r["coded"].output_tokens)[0] for r in rows)
    cg_raw_all = sum(agreement(r["raw"].output_tokens, r["coded"].output_tokens)[0] for r in rows)
    print(f"\nagreement with a fresh prefill: raw hit {raw_all}/{total} ({raw_all / total:.1%}), "
          f"{args.method} hit {cg_all}/{total} ({cg_all / total:.1%}); {args.method} hit with the raw hit "
          f"(same float16 KV before coding) {cg_raw_all}/{total} ({cg_raw_all / total:.1%})")
    print(f"median TTFT: fresh {statistics.median(r['fresh'].ttft_s for r in rows):.3f}s, raw hit "
          f"{statistics.median(r['raw'].ttft_s for r in rows):.3f}s, {args.method} hit "
          f"{statistics.median(r['coded'].ttft_s for r in rows):.3f}s; compress "
          f"{statistics.median(r['compress_s'] for r in rows):.2f}s per prompt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
