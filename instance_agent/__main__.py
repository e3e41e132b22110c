"""``kvmesh-agent``: one instance agent as a process (config from --config or LMCACHE_CONFIG_FILE)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from kvmesh.core.requestid import configure_logging
from kvmesh.core.security import SecuritySettings
from kvmesh.errors import KVMeshError

from .config import AgentConfig, load_config, with_model_flags, with_security_flags

logger = logging.getLogger("kvmesh.instance_agent")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmesh-agent", description="Run a kvmesh instance agent for one engine worker.")
    p.add_argument("--config", help="yaml file with LMCache's keys (default: $LMCACHE_CONFIG_FILE)")
    p.add_argument("--worker-id", type=int, default=0, help="the worker rank (picks lmcache_worker_ports[rank])")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of /metrics (default 9101 + worker id; 0 a free port; negative disables)")
    p.add_argument("--host", default=None, help="address to bind and register (default: p2p_host or localhost)")
    p.add_argument("--model", default=None,
                   help="the served model's name (a Hugging Face id): its codec files (query profile, layer "
                        "predictor) are looked up by it (config key 'model')")
    p.add_argument("--model-files", default=None, metavar="DIR",
                   help="a model-files folder (holding <model key>/ folders) searched first, before "
                        "$KVMESH_MODEL_FILES and $KVMESH_CACHE_DIR/model-files (config key 'model_files')")
    p.add_argument("--log-level", default=os.environ.get("KVMESH_LOG_LEVEL", "INFO"))
    SecuritySettings.add_arguments(p)
    return p


async def _serve(args: argparse.Namespace, config: AgentConfig) -> int:
    from .agent import InstanceAgent  # torch and the codecs load only once the config is known good

    _limit_torch_threads()
    agent = InstanceAgent(config, args.worker_id, host=args.host, metrics_port=args.metrics_port)
    await agent.start()
    # One line on stdout that scripts can wait for; the rest goes to the log on stderr.
    print(f"kvmesh-agent ready grpc={agent.host}:{agent.grpc_port} metrics={agent.metrics_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stopping")
    await agent.stop()
    return 0


def _limit_torch_threads() -> None:
    """One torch thread per codec call (KVMESH_TORCH_THREADS, default 1): the agent already runs a
    codec call per core on its pool, and torch's own threads on top of those oversubscribe the
    machine (bench/bench_remote.py on a busy 2-core host: raw puts 10x slower with the default)."""
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("KVMESH_TORCH_THREADS", "1"))))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, stream=sys.stderr)
    try:
        config = with_model_flags(with_security_flags(load_config(args.config), args), args)
        return asyncio.run(_serve(args, config))
    except KVMeshError as err:
        logger.error("cannot start: %s", err.message)
        return 2
    except OSError as err:
        logger.error("cannot start: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
