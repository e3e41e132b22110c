"""End-to-end fixtures: the real ``kvmesh-controller`` and ``kvmesh-serve`` processes, started with
the seed's flags and the repository's ``example.yaml``; only the ports are replaced by free ones
(flags, and ``LMCACHE_<KEY>`` overrides for the agent inside the engine)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.engine.serving import served_model_files
from tests.support import REPO, console_script, free_port, running, wait_http_ok

INSTANCE = "lmcache_default_instance"  # example.yaml's
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The first start in a fresh cache converts the GGUF (~15-70 s on a busy 2-core machine).
ENGINE_START_TIMEOUT = 300.0
EVENT_TIMEOUT = 120.0


def http(method: str, url: str, body: Any = None, *, raw: bytes | None = None,
         timeout: float = 120.0) -> tuple[int, Any]:
    """One call; returns (status, parsed JSON or text), errors included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return status, text


@dataclass
class Mesh:
    engine: str
    controller: str
    controller_grpc: str
    log_dir: Path

    def ok(self, method: str, url: str, body: Any = None) -> Any:
        status, answer = http(method, url, body)
        assert status == 200, f"{method} {url} -> {status}: {answer}"
        return answer

    def complete(self, prompt: Any, max_tokens: int = 10, **extra: Any) -> dict[str, Any]:
        return self.ok("POST", f"{self.engine}/v1/completions",
                       {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})

    def tokenize(self, prompt: str) -> list[int]:
        answer = self.ok("POST", f"{self.engine}/tokenize", {"model": MODEL, "prompt": prompt})
        assert answer["count"] == len(answer["tokens"])
        return answer["tokens"]

    def operate(self, op: str, tokens: list[int], method: str = "cachegen") -> dict[str, Any]:
        return self.ok("POST", f"{self.controller}/{op}", {"instance_id": INSTANCE, "method": method,
                                                         "location": "LocalCPUBackend", "tokens": tokens})

    def finish(self, event_id: str) -> dict[str, Any]:
        """Polls check_finish until the event ends (deadline), then returns the full event."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            status = self.ok("POST", f"{self.controller}/check_finish", {"event_id": event_id})["status"]
            if status in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, f"event {event_id} still {status} after {EVENT_TIMEOUT}s"
            time.sleep(0.05)
        return self.ok("GET", f"{self.controller}/events/{event_id}")["event"]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.engine}/metrics", timeout=30) as resp:
            return resp.read().decode()

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                         for p in sorted(self.log_dir.glob("*.log")))


def wait_registered(controller: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, answer = http("POST", f"{controller}/query_worker_info", {"instance_id": INSTANCE})
        if status == 200 and any(w.get("state") == "up" for w in answer.get("worker_infos", [])):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{INSTANCE} did not register with the controller within {timeout}s")


def wait_agent_connected(engine: str, timeout: float = 60.0) -> None:
    """The controller lists a worker once RegisterWorker lands; the agent counts itself connected only
    after its KV resync is accepted too. Tests start from the latter."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{engine}/metrics", timeout=30) as resp:
            if "kvmesh_agent_controller_connected 1.0" in resp.read().decode():
                return
        time.sleep(0.1)
    raise TimeoutError(f"the engine's agent did not report itself connected within {timeout}s")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    logs = tmp_path_factory.mktemp("e2e-logs")
    served_model_files()  # the engine finds SmolLM2's codec files: made once per environment, not per start
    http_port, grpc_port, engine_port = free_port(), free_port(), free_port()
    controller_args = [console_script("kvmesh-controller"), "--host", "localhost", "--port", str(http_port),
                       "--monitor-port", str(grpc_port)]
    engine_env = {
        "LMCACHE_CONFIG_FILE": str(REPO / "example.yaml"),
        "LMCACHE_CONTROLLER_PULL_URL": f"localhost:{grpc_port}",
        "LMCACHE_LMCACHE_WORKER_PORTS": str(free_port()),
        "LMCACHE_P2P_INIT_PORTS": str(free_port()),
    }
    engine_args = [console_script("kvmesh-serve"), "--port", str(engine_port)]
    with running(controller_args, log=logs / "controller.log") as controller:
        controller_url = f"http://localhost:{http_port}"
        wait_http_ok(f"{controller_url}/metrics", timeout=60, proc=controller)
        with running(engine_args, env=engine_env, log=logs / "engine.log") as engine:
            engine_url = f"http://localhost:{engine_port}"
            try:
                wait_http_ok(f"{engine_url}/health", timeout=ENGINE_START_TIMEOUT, proc=engine)
                wait_registered(controller_url)
                wait_agent_connected(engine_url)
            except (RuntimeError, TimeoutError) as err:
                tail = (logs / "engine.log").read_text(errors="replace")[-4000:]
                raise RuntimeError(f"{err}\nengine log:\n{tail}") from err
            yield Mesh(engine=engine_url, controller=controller_url, controller_grpc=f"localhost:{grpc_port}",
                       log_dir=logs)
