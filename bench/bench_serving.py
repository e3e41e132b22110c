"""Quality in serving (issue 4): completions from a compressed-then-decoded cache vs a fresh prefill.

The embedded engine's own completion path (``kvmesh.engine.completion.CompletionRunner``) runs with a
real ``EmbeddedAgent`` (CPU location, gRPC on a free loopback port, no controller):

  for each group: a shared prefix of ``--prefix-tokens`` tokens of prose (windows of the held-out text
  of ``bench/realkv.py``, so the codec was not tuned on it) and ``--suffixes`` different questions;
  1. reference: every prompt completed greedily with no cache at all (a fresh prefill);
  2. per method: a fresh agent stores the prefix (one request for the prefix alone), the agent
     compresses it with the method (``raw`` = left uncompressed), then every prompt is completed again:
     the prefix's chunks are loaded from the agent (decoded on the way) and only the suffix is prefilled.
  Reported per method: share of greedy output tokens equal to the reference at the same position,
  share of completions identical to the reference, mean common-prefix length, prompt tokens served
  from the cache, and median time to first token (fresh prefill vs cache hit).

    python bench/bench_serving.py [--methods raw,cachegen,cachegen-hq] [--groups 2] [--suffixes 3]
                                  [--prefix-tokens 1024] [--max-tokens 32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import realkv  # noqa: E402
from kvmesh.engine.completion import CompletionRunner  # noqa: E402
from kvmesh.engine.sampling import SamplingParams  # noqa: E402
from kvmesh.instance_agent.agent import EmbeddedAgent  # noqa: E402
from kvmesh.instance_agent.config import config_from_dict  # noqa: E402

LOCATION = "LocalCPUBackend"
QUESTIONS = [
    "\n\nQuestion: Who are the characters in the passage above?\nAnswer:",
    "\n\nQuestion: Where does the passage above take place?\nAnswer:",
    "\n\nSummary of the passage above in one sentence:",
    "\n\nQuestion: What happens next in the story?\nAnswer:",
    "\n\nThe tone of the passage above is",
    "\n\nQuestion: What does Alice want?\nAnswer:",
]


def _params(max_tokens: int) -> SamplingParams:
    # ignore_eos: every run compares the same number of tokens
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def _drain_compress(agent: Any, tokens: list[int], method: str) -> Any:
    final = None
    async for progress in await agent.compress(tokens, method, LOCATION):
        if progress.final:  # the last message carries the totals
            final = progress
    return final


def _agreement(ref: list[int], got: list[int]) -> tuple[float, bool, int]:
    n = max(len(ref), 1)
    same = sum(1 for a, b in zip(ref, got) if a == b)
    common = 0
    for a, b in zip(ref, got):
        if a != b:
            break
        common += 1
    return same / n, ref == got, common


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--methods", default="raw,cachegen,cachegen-hq")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--suffixes", type=int, default=3)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--source", default="heldout", choices=list(realkv.SOURCES))
    args = parser.parse_args(argv)
    if not 1 <= args.suffixes <= len(QUESTIONS):
        parser.error(f"--suffixes must be 1..{len(QUESTIONS)}")

    model, tokenizer = realkv._model()  # same loader, at most 2 threads
    params = _params(args.max_tokens)
    prefixes = [w[:args.prefix_tokens] for w in realkv.windows(args.source, args.groups)]
    suffix_ids = [tokenizer(q, add_special_tokens=False).input_ids for q in QUESTIONS[:args.suffixes]]
    prompts = [[p + s for s in suffix_ids] for p in prefixes]

    fresh_runner = CompletionRunner(model, tokenizer, None, kv_dtype=torch.float16, max_model_len=8192)
    reference: list[list[list[int]]] = []
    fresh_ttft: list[float] = []
    for group in prompts:
        outs = []
        for prompt in group:
            c = fresh_runner.complete(prompt, params)
            outs.append(c.output_tokens)
            fresh_ttft.append(c.ttft_s)
        reference.append(outs)

    print(f"\nserving quality: SmolLM2-135M-Instruct on CPU ({torch.get_num_threads()} threads), "
          f"{args.groups} prefixes × {args.suffixes} prompts, {args.prefix_tokens}-token shared prefix "
          f"({args.source} text), {args.max_tokens} greedy tokens; fresh-prefill TTFT median "
          f"{statistics.median(fresh_ttft) * 1000:.0f} ms\n")
    print("| cache | token agreement | identical completions | mean common prefix | prompt tokens from cache "
          "| stored bytes vs fp16 | TTFT hit (median) | TTFT fresh (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in filter(None, args.methods.split(",")):
        config = config_from_dict({"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 2,
                                   "lmcache_worker_ports": [0], "p2p_host": "127.0.0.1"})
        agreements, identical, commons, cached, hit_ttft = [], 0, [], [], []
        before = after = 0
        with EmbeddedAgent(config, worker_id=0, metrics_port=-1) as agent:
            runner = CompletionRunner(model, tokenizer, agent, kv_dtype=torch.float16, max_model_len=8192)
            for g, group in enumerate(prompts):
                runner.complete(prefixes[g], _params(1))  # stores the prefix's chunks
                if method != "raw":
                    final = agent._call(_drain_compress(agent.agent, prefixes[g], method))
                    if final is None or final.error:
                        raise RuntimeError(f"compress with {method} failed: {getattr(final, 'error', 'no answer')}")
                    before += final.bytes_before
                    after += final.bytes_after
                for i, prompt in enumerate(group):
                    c = runner.complete(prompt, params)
                    share, same, common = _agreement(reference[g][i], c.output_tokens)
                    agreements.append(share)
                    identical += same
                    commons.append(common)
                    cached.append(c.cached_tokens)
                    hit_ttft.append(c.ttft_s)
        n = len(agreements)
        ratio = f"{before / after:.2f}×" if after else "1.00× (fp16)"
        print(f"| {method} | {100 * statistics.mean(agreements):.1f}% | {identical}/{n} | "
              f"{statistics.mean(commons):.1f} / {args.max_tokens} | {statistics.mean(cached):.0f} | {ratio} | "
              f"{statistics.median(hit_ttft) * 1000:.0f} ms | {statistics.median(fresh_ttft) * 1000:.0f} ms |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
