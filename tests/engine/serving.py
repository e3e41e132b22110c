"""A real ``kvmesh-serve`` process for the engine's HTTP tests: free ports, an agent config of its
own (small chunks, local CPU storage, no controller), started and waited for through ``/health``."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support import console_script, free_port, running, wait_http_ok

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHUNK_SIZE = 16
START_TIMEOUT = 300.0  # the first start in a fresh cache converts the GGUF


def agent_yaml(path: Path) -> Path:
    """An agent config with 16-token chunks (short prompts fill several) and no controller."""
    path.write_text(f"chunk_size: {CHUNK_SIZE}\nlocal_cpu: True\nmax_local_cpu_size: 0.5\nenable_controller: False\n"
                    f"lmcache_instance_id: engine-test\nlmcache_worker_ports: {free_port()}\n"
                    f"p2p_init_ports: {free_port()}\n")
    return path


@functools.cache
def served_model_files() -> Path:
    """The folder of SmolLM2's codec files in this environment's cache (where every kvmesh-serve the
    tests start finds them), made here once if absent: so no test's server start pays for the
    calibration (over a minute on a busy 2-core machine) and the suite makes them at most once."""
    import torch

    from kvmesh.codecs.model_files import find_model_files
    from kvmesh.engine.calibrate import RECIPE_VERSION, recipe_version
    from kvmesh.engine.model import ensure_model_files, load_model
    from kvmesh.instance_agent.config import AgentConfig

    roots = AgentConfig().model_file_roots()
    found = find_model_files(MODEL, roots)
    if found is None or (recipe_version(found.folder) or RECIPE_VERSION) < RECIPE_VERSION:  # absent or an older recipe's
        model, tokenizer = load_model(torch.float32)
        found = ensure_model_files(model, tokenizer, MODEL, roots)
    return found.folder


@contextlib.contextmanager
def kvmesh_serve(tmp: Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 ready_path: str = "/health") -> Iterator[str]:
    """Runs ``kvmesh-serve`` on a free loopback port; yields its base URL once ``/health`` answers."""
    if "--no-model-files" not in args and "--model-files" not in args:
        served_model_files()
    port = free_port()
    log = tmp / "engine.log"
    argv = [console_script("kvmesh-serve"), "--port", str(port), "--threads", "1", *args]
    full_env = {"KVMESH_AUTH_TOKEN_FILE": "", "LMCACHE_CONFIG_FILE": str(agent_yaml(tmp / "agent.yaml")),
                **(env or {})}
    with running(argv, env=full_env, log=log) as proc:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http_ok(url + ready_path, timeout=START_TIMEOUT, proc=proc)
        except (RuntimeError, TimeoutError) as err:
            raise RuntimeError(f"{err}\nengine log:\n{log.read_text(errors='replace')[-4000:]}") from err
        yield url
