#!/usr/bin/env python3
"""Model files and quality (issue 17.1): cachegen with the served model's files, through the product path, on four held-out texts.

The path is the one ``kvmesh-serve`` runs: SmolLM2-135M-Instruct in the engine's ``CompletionRunner``, a
real ``EmbeddedAgent`` configured with the model's files (made by ``kvmesh.engine.calibrate`` from the
packaged calibration corpus, or taken from ``--files``), the context's KV stored through the engine
(float16 chunks of 256 tokens), compressed through the agent's gRPC ``Compress``, and loaded back by
the engine (decoded by the agent).

Per window (1,024 context + 256 continuation tokens): the engine prefills and stores the context; it
loads the raw context back and scores the continuation (the reference); the context is compressed
with a method, loaded back (decoded) and the continuation scored again; then the chunks are cleared
and the raw KV stored again for the next method. Reported per text and method:
  ratio      float16 bytes / compressed bytes of the context chunks (the agent's own byte counts),
  NLL change mean NLL of the true next tokens with the decoded context minus with the raw one (nats),
  top-1      share of the 256 positions whose argmax agrees,
and PASS/FAIL against the goal for the default method (ratio >= 8, NLL change <= 0.01, top-1 >= 95%).

Texts (fetched once from PyPI sdists and cached under $KVMESH_CACHE_DIR/data, as bench/realkv.py does;
none is in the calibration corpus, none was used for tuning): fiction = *As You Like It* (Canterbury
corpus, brotli sdist), technical = the reStructuredText specification (docutils sdist), legal = the
GNU GPL v3 (docutils sdist), code = brotli's c/enc/encode.c. Windows are 1,536 tokens (bench/realkv.py)
with starts evenly spaced over the whole text; the GPL (~8,000 tokens) and encode.c give windows that
overlap (the table says how far).

    python bench/model_files_quality.py [--windows 16] [--texts fiction,technical,legal,code]
                                        [--methods cachegen,cachegen-hq] [--files ROOT] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.realkv as rk  # noqa: E402
from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402
from kvmesh.codecs.model_files import ModelFiles, find_model_files  # noqa: E402
from kvmesh.core.channels import channel as mesh_channel  # noqa: E402
from kvmesh.engine.calibrate import BUILTIN_MODEL, RECIPE_VERSION, make_model_files, recipe_version  # noqa: E402
from kvmesh.engine.completion import CompletionRunner  # noqa: E402
from kvmesh.engine.sampling import SamplingParams  # noqa: E402
from kvmesh.instance_agent.agent import EmbeddedAgent  # noqa: E402
from kvmesh.instance_agent.config import config_from_dict  # noqa: E402

TEXTS = ("fiction", "technical", "legal", "code")
GOAL_RATIO, GOAL_NLL, GOAL_TOP1 = 8.0, 0.01, 0.95
LOCATION = "LocalCPUBackend"
CTX, CONT = rk.CONTEXT_TOKENS, rk.CONTINUATION_TOKENS


def model_files(root: str | None, remake: bool, model: Any, tokenizer: Any) -> ModelFiles:
    """The model's files: found under ``root`` (or the default roots), else (or when an older recipe made
    them) made there once."""
    roots = [root] if root else None
    found = None if remake else find_model_files(BUILTIN_MODEL, roots)
    if found is not None and (recipe_version(found.folder) or RECIPE_VERSION) < RECIPE_VERSION:
        print(f"{found.folder}: made by recipe version {recipe_version(found.folder)}, remaking them "
              f"(this release's is {RECIPE_VERSION})", file=sys.stderr)
        found = None
    if found is None:
        t0 = time.perf_counter()
        make_model_files(model, tokenizer, BUILTIN_MODEL, root, lambda m: print(m, file=sys.stderr, flush=True))
        print(f"made the model files in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        found = find_model_files(BUILTIN_MODEL, roots)
    assert found is not None
    return found


def agent_config(files: ModelFiles) -> Any:
    """The agent's config as kvmesh-serve writes it: the served model's name and the folder its files
    are looked up in (``model:`` / ``model_files:``), so every method gets its own level's files."""
    return config_from_dict({"chunk_size": rk.CHUNK_TOKENS, "local_cpu": True, "max_local_cpu_size": 2,
                             "lmcache_worker_ports": 0, "lmcache_instance_id": "bench-model-files",
                             "model": files.model, "model_files": str(files.folder.parent)}, env={})


class Bench:
    def __init__(self, runner: CompletionRunner, agent: EmbeddedAgent, stub: agent_pb2_grpc.InstanceAgentStub) -> None:
        self.runner, self.agent, self.stub = runner, agent, stub

    def score(self, window: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL per continuation position, argmax) with the context the engine loads from the agent."""
        model = self.runner.model
        with torch.inference_mode():
            cached, past = self.runner._load_prefix(window[:CTX + 1])
            if cached != CTX:
                raise RuntimeError(f"the engine loaded {cached} context tokens, expected {CTX}")
            cont = torch.tensor([window[CTX:CTX + CONT]], dtype=torch.long)
            logits = model(input_ids=cont, use_cache=True, **{self.runner._cache_kw: past}).logits[0].float()
        targets = torch.tensor(window[CTX + 1:CTX + CONT + 1], dtype=torch.long)
        logp = torch.log_softmax(logits, dim=-1)
        return -logp.gather(1, targets[:, None])[:, 0], logits.argmax(dim=-1)

    def compress(self, tokens: list[int], method: str) -> tuple[int, int]:
        final = None
        for msg in self.stub.Compress(agent_pb2.CompressRequest(tokens=tokens, method=method, location=LOCATION),
                                      timeout=600):
            if msg.final:
                final = msg
        if final is None or final.error or final.chunks_done != CTX // rk.CHUNK_TOKENS:
            raise RuntimeError(f"compress {method}: {final}")
        return int(final.bytes_before), int(final.bytes_after)

    def clear(self, tokens: list[int]) -> None:
        self.stub.Clear(agent_pb2.ClearRequest(location=LOCATION, tokens=tokens), timeout=60)

    def window(self, window: list[int], methods: list[str]) -> dict[str, dict[str, float]]:
        ctx = window[:CTX]
        self.clear(ctx)
        # the engine prefills the context and stores its KV (float16 chunks) through the agent
        self.runner.complete(ctx, SamplingParams(max_tokens=1, temperature=0.0))
        found, raw_kv = self.agent.retrieve(ctx)
        if found != CTX or raw_kv is None:
            raise RuntimeError(f"the agent holds {found} of the {CTX} context tokens")
        ref_nll, ref_arg = self.score(window)
        out = {}
        for method in methods:
            before, after = self.compress(ctx, method)
            nll, arg = self.score(window)
            out[method] = {"bytes_before": before, "bytes_after": after,
                           "nll_delta": float((nll - ref_nll).mean()), "top1": float((arg == ref_arg).float().mean()),
                           "nll_ref": float(ref_nll.mean())}
            self.clear(ctx)
            self.agent.store(ctx, raw_kv)  # the same raw chunks for the next method
        return out


def overlap(text: str, n: int) -> float:
    """Share of a window's tokens that the next window also covers (0 = disjoint)."""
    ids = rk._source_tokens(text)
    span = len(ids) - rk.WINDOW_TOKENS
    step = span / (n - 1) if n > 1 else float("inf")
    return max(0.0, 1 - step / rk.WINDOW_TOKENS)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--texts", default=",".join(TEXTS))
    p.add_argument("--methods", default="cachegen,cachegen-hq")
    p.add_argument("--files", default=None, help="model-files root (default: $KVMESH_MODEL_FILES / the cache folder; "
                                                 "made there when missing)")
    p.add_argument("--remake", action="store_true", help="make the model files again first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    texts = [t for t in args.texts.split(",") if t]
    for t in texts:
        if t not in rk.SOURCES:
            p.error(f"unknown text {t!r}; valid: {', '.join(TEXTS)}")
    methods = [m for m in args.methods.split(",") if m]

    model, tokenizer = rk._model()
    files = model_files(args.files, args.remake, model, tokenizer)
    config = agent_config(files)
    results: dict[str, dict[str, Any]] = {}
    with EmbeddedAgent(config, worker_id=0, metrics_port=-1) as agent:
        runner = CompletionRunner(model, tokenizer, agent, kv_dtype=torch.float16, max_model_len=8192)
        channel = mesh_channel(f"localhost:{agent.grpc_port}", config.security)
        bench = Bench(runner, agent, agent_pb2_grpc.InstanceAgentStub(channel))
        for text in texts:
            t0 = time.perf_counter()
            per = [bench.window(w, methods) for w in rk.windows(text, args.windows)]
            results[text] = {"windows": len(per), "overlap": overlap(text, args.windows),
                             "tokens": len(rk._source_tokens(text)), "seconds": time.perf_counter() - t0,
                             "methods": {m: {"ratio": sum(w[m]["bytes_before"] for w in per) / sum(w[m]["bytes_after"] for w in per),
                                             "nll_delta": float(np.mean([w[m]["nll_delta"] for w in per])),
                                             "top1": float(np.mean([w[m]["top1"] for w in per])),
                                             "nll_ref": float(np.mean([w[m]["nll_ref"] for w in per])),
                                             "worst_window_nll_delta": float(max(w[m]["nll_delta"] for w in per))}
                                         for m in methods}}
            print(f"{text}: {len(per)} windows in {results[text]['seconds']:.0f} s", file=sys.stderr, flush=True)
        channel.close()

    print(f"\nSmolLM2-135M-Instruct through CompletionRunner + EmbeddedAgent (gRPC Compress, method's codec with "
          f"the model's files from {files.folder}); {args.windows} windows per text of {CTX} context + {CONT} "
          f"continuation tokens; torch threads {args.threads}. Goal for cachegen: ratio >= {GOAL_RATIO:g}x, NLL "
          f"change <= {GOAL_NLL}, top-1 >= {GOAL_TOP1:.0%} on each text.\n")
    print("| text | tokens (window overlap) | method | ratio | NLL change (nats) | top-1 | worst window NLL | "
          "ratio goal | NLL goal | top-1 goal |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for text, r in results.items():
        for m, s in r["methods"].items():
            goals = ([verdict(s["ratio"] >= GOAL_RATIO), verdict(s["nll_delta"] <= GOAL_NLL), verdict(s["top1"] >= GOAL_TOP1)]
                     if m == "cachegen" else ["-", "-", "-"])
            print(f"| {text} | {r['tokens']} ({r['overlap']:.0%}) | {m} | {s['ratio']:.2f}x | {s['nll_delta']:+.4f} | "
                  f"{100 * s['top1']:.1f}% | {s['worst_window_nll_delta']:+.4f} | {' | '.join(goals)} |")
    if args.json:
        args.json.write_text(json.dumps({"files": str(files.folder), "windows": args.windows, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
