#!/usr/bin/env python3
"""Quality and time to first token in serving, per codec level: greedy completions of the embedded
engine's model (SmolLM2-135M-Instruct, CPU) over prompts that share a long document prefix, from

- a fresh prefill (no cache),
- a cache hit on raw stored KV (float16 chunks in the agent),
- a cache hit on KV compressed through the agent's gRPC Compress (decoded on load), for each method
  of ``--methods`` (default: cachegen, cachegen-hq),

with the real ``CompletionRunner`` and a real ``EmbeddedAgent`` configured as ``kvmesh-serve``
configures its own: ``model`` names the served model, so the agent looks its codec files up (query
profile, layer predictors, level schedules; made once, as kvmesh-serve makes them, when none are
found). No HTTP, no controller: the same code paths ``kvmesh-serve`` runs. Prints markdown tables;
numbers go to BENCHMARKS.md.

    python bench/serving_quality.py [--questions 8] [--max-tokens 32] [--methods cachegen,cachegen-hq]
                                    [--threads 2] [--model-files DIR | --no-model-files]

Agreement = generated tokens equal position by position (to the fresh prefill's, or to the raw
hit's: the same float16 KV before coding, which isolates the codec); "first token" = the first
generated token equal (it depends on the cached KV alone); "same prefix" = tokens before the first
difference. TTFT = request start to first token, including the agent's load (and decode) of the
cached prefix. Ratio = the agent's bytes before / after Compress over all prompts.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402
from kvmesh.core.channels import channel as mesh_channel  # noqa: E402
from kvmesh.engine.__main__ import DEFAULT_MODEL_NAME  # noqa: E402
from kvmesh.engine.completion import CompletionRunner  # noqa: E402
from kvmesh.engine.model import ensure_model_files, load_model  # noqa: E402
from kvmesh.engine.sampling import SamplingParams  # noqa: E402
from kvmesh.instance_agent.agent import EmbeddedAgent  # noqa: E402
from kvmesh.instance_agent.config import config_from_dict  # noqa: E402
from tests.e2e.prompts import LONG_PROMPT  # noqa: E402

CPU = "LocalCPUBackend"
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


def run_op(stub: agent_pb2_grpc.InstanceAgentStub, op: str, tokens: list[int], method: str) -> Any:
    """The final progress message of a Compress / Decompress of ``tokens`` in CPU memory."""
    request = agent_pb2.CompressRequest if op == "compress" else agent_pb2.DecompressRequest
    call = stub.Compress if op == "compress" else stub.Decompress
    final = None
    for msg in call(request(tokens=tokens, method=method, location=CPU), timeout=600):
        final = msg
    if final is None or final.error:
        raise RuntimeError(f"{op} {method}: {final.error if final is not None else 'no answer'}")
    return final


@dataclass
class Level:
    """One level's results over every prompt."""

    name: str
    ttft: list[float] = field(default_factory=list)
    vs_fresh: list[tuple[int, int]] = field(default_factory=list)  # (equal, common prefix) per prompt
    vs_raw: list[tuple[int, int]] = field(default_factory=list)
    first_fresh: int = 0
    first_raw: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    compress_s: list[float] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--methods", default="cachegen,cachegen-hq", help="comma-separated codec methods to compare")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-files", default=None, help="model-files folder searched first (the agent's model_files)")
    p.add_argument("--no-model-files", action="store_true", help="the agent without the model's codec files")
    return p.parse_args()


def agent_config(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    """The agent's config as kvmesh-serve makes it: ``model`` set, its files found or made once."""
    raw: dict[str, Any] = {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 2,
                           "lmcache_worker_ports": 0, "lmcache_instance_id": "bench"}
    if not args.no_model_files:
        raw["model"] = DEFAULT_MODEL_NAME
        if args.model_files:
            raw["model_files"] = args.model_files
    config = config_from_dict(raw, env={})
    if config.model:
        ensure_model_files(model, tokenizer, config.model, config.model_file_roots(), root=config.model_files,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    return config


def measure(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[list[Level], list[str]]:
    config = agent_config(args, model, tokenizer)
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prefill = Level("fresh prefill (no cache)")
    raw = Level("raw")
    levels = [Level(m) for m in args.methods.split(",") if m]
    with EmbeddedAgent(config, worker_id=0, metrics_port=-1) as agent:
        files = agent.agent.model_files()
        cached_runner = CompletionRunner(model, tokenizer, agent, kv_dtype=torch.float16, max_model_len=8192)
        fresh_runner = CompletionRunner(model, tokenizer, None, kv_dtype=torch.float16, max_model_len=8192)
        channel = mesh_channel(f"localhost:{agent.grpc_port}", config.security)
        stub = agent_pb2_grpc.InstanceAgentStub(channel)
        fresh_runner.complete(fresh_runner.tokenize("warm up"), SamplingParams(max_tokens=2, temperature=0.0))
        for question in QUESTIONS[: args.questions]:
            tokens = cached_runner.tokenize(LONG_PROMPT + question)
            fresh = fresh_runner.complete(tokens, greedy)
            cached_runner.complete(tokens, SamplingParams(max_tokens=1, temperature=0.0))  # stores the chunks
            hit = cached_runner.complete(tokens, greedy)
            record(prefill, fresh, fresh.output_tokens, hit.output_tokens)
            record(raw, hit, fresh.output_tokens, hit.output_tokens)
            for level in levels:
                assert cached_runner.complete(tokens, SamplingParams(max_tokens=1, temperature=0.0)).cached_tokens > 0
                t0 = time.perf_counter()
                final = run_op(stub, "compress", tokens, level.name)
                level.compress_s.append(time.perf_counter() - t0)
                level.bytes_before += final.bytes_before
                level.bytes_after += final.bytes_after
                coded = cached_runner.complete(tokens, greedy)
                record(level, coded, fresh.output_tokens, hit.output_tokens)
                # Back to the prefill's own float16 KV for the next level (a decompress would leave
                # this level's decoded, lossy values): drop the chunks and store them again.
                stub.Clear(agent_pb2.ClearRequest(location=CPU, tokens=tokens), timeout=60)
                cached_runner.complete(tokens, SamplingParams(max_tokens=1, temperature=0.0))
        channel.close()
    return [prefill, raw, *levels], files


def record(level: Level, result: Any, fresh: list[int], raw: list[int]) -> None:
    out = result.output_tokens
    level.ttft.append(result.ttft_s)
    level.vs_fresh.append(agreement(fresh, out))
    level.vs_raw.append(agreement(raw, out))
    level.first_fresh += int(out[:1] == fresh[:1])
    level.first_raw += int(out[:1] == raw[:1])


def report(args: argparse.Namespace, levels: list[Level], files: list[str]) -> None:
    n, prompts = args.max_tokens, len(levels[0].ttft)
    total = n * prompts
    print(f"\nSmolLM2-135M-Instruct, float32 compute, float16 KV chunks of 256 tokens, {prompts} prompts "
          f"(a {len(LONG_PROMPT)}-character document + a question), greedy {n} tokens, torch threads "
          f"{args.threads}; the agent's model files: {', '.join(files) or 'none'}\n")
    print("| level | ratio | TTFT median (s) | first token = fresh | tokens = fresh | first token = raw hit "
          "| tokens = raw hit | same prefix vs raw (mean) | compress (s, median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        ratio = f"{lv.bytes_before / lv.bytes_after:.2f}x" if lv.bytes_after else "1x"
        fresh_eq = sum(s for s, _ in lv.vs_fresh)
        raw_eq = sum(s for s, _ in lv.vs_raw)
        prefix = statistics.mean(p for _, p in lv.vs_raw)
        comp = f"{statistics.median(lv.compress_s):.2f}" if lv.compress_s else "-"
        print(f"| {lv.name} | {ratio} | {statistics.median(lv.ttft):.3f} | {lv.first_fresh}/{prompts} | "
              f"{fresh_eq}/{total} ({fresh_eq / total:.0%}) | {lv.first_raw}/{prompts} | "
              f"{raw_eq}/{total} ({raw_eq / total:.0%}) | {prefix:.1f} | {comp} |")
    print("\nper prompt: tokens equal to the raw hit's (of {n}), and the common prefix".format(n=n))
    coded = levels[2:]
    print("| prompt | " + " | ".join(lv.name for lv in coded) + " |")
    print("|---|" + "---|" * len(coded))
    for i in range(prompts):
        cells = [f"{lv.vs_raw[i][0]} ({lv.vs_raw[i][1]})" for lv in coded]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(torch.float32)
    levels, files = measure(args, model, tokenizer)
    report(args, levels, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
