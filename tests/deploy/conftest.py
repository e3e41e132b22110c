"""A real mesh for the deploy tests: ``kvmesh-controller`` and ``kvmesh-agent`` as processes started
through the images' entrypoint (deploy/docker/entrypoint.sh), raw KV put into the agent, one compress
through the controller's HTTP gateway; and a real Prometheus server scraping it with
deploy/prometheus's config and rules. Shared by the Prometheus and Grafana tests (one of each per
session: the machine is small)."""
from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.api.common.v1 import common_pb2
from tests.deploy.deploy_support import DEPLOY, tool
from tests.support import VENV_BIN, free_port, running, wait_grpc_healthy, wait_http_ok

INSTANCE_ID = "deploy-test-instance"
LOCATION = "LocalCPUBackend"
METHOD = "int8"  # a fixed-rate codec: the ratio over fp16 is known to exceed 1
CHUNK_SIZE = 16
NUM_TOKENS = 40  # two full chunks and a partial one
NUM_CHUNKS = 3
KV_SHAPE = (2, 2, NUM_TOKENS, 64)  # [K/V, layers, tokens, channels]
DEADLINE_S = 60.0


@dataclass
class Mesh:
    """Where the running controller and agent listen, and what the compress did."""

    http_port: int
    grpc_port: int
    agent_port: int
    agent_metrics_port: int
    tmp: Path
    env: dict[str, str]
    event: dict
    tokens: list[int]

    def scrape(self, port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return resp.read().decode()


def http_json(method: str, url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def poll(what: str, check, deadline_s: float = DEADLINE_S, proc_logs: list[Path] = ()):  # noqa: ANN001
    """Call ``check`` until it returns something truthy, or fail with the last value and the logs."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as err:  # noqa: BLE001 - not there yet
            last = err
        else:
            if last:
                return last
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in proc_logs if p.exists())
    pytest.fail(f"{what}: not after {deadline_s}s (last: {last!r})\n{logs}")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mesh")
    http_port, grpc_port, agent_port, metrics_port = (free_port() for _ in range(4))
    config = tmp / "lmcache.yaml"
    config.write_text(yaml.safe_dump({
        "chunk_size": CHUNK_SIZE, "local_cpu": True, "max_local_cpu_size": 0.05,
        "enable_controller": True, "lmcache_instance_id": INSTANCE_ID,
        "controller_pull_url": f"127.0.0.1:{grpc_port}", "lmcache_worker_ports": agent_port,
        "p2p_host": "127.0.0.1", "p2p_init_ports": 0,
    }))
    # The entrypoint runs `kvmesh-<role>` from PATH, as in the image; TMPDIR keeps its role note here.
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": str(tmp),
           "LMCACHE_CONFIG_FILE": str(config)}
    entrypoint = ["sh", str(DEPLOY / "docker" / "entrypoint.sh")]
    logs = [tmp / "controller.log", tmp / "agent.log"]
    with contextlib.ExitStack() as stack:
        controller = stack.enter_context(running(
            [*entrypoint, "controller", "--host", "127.0.0.1", "--port", str(http_port),
             "--monitor-port", str(grpc_port), "--health-check-interval", "0.5"], env=env, log=logs[0]))
        agent = stack.enter_context(running(
            [*entrypoint, "agent", "--metrics-port", str(metrics_port)], env=env, log=logs[1]))
        wait_grpc_healthy(f"127.0.0.1:{grpc_port}", timeout=DEADLINE_S)
        wait_http_ok(f"http://127.0.0.1:{http_port}/metrics", timeout=DEADLINE_S, proc=controller)
        wait_grpc_healthy(f"127.0.0.1:{agent_port}", timeout=DEADLINE_S)
        wait_http_ok(f"http://127.0.0.1:{metrics_port}/metrics", timeout=DEADLINE_S, proc=agent)
        gateway = f"http://127.0.0.1:{http_port}"
        poll("the agent registers with the controller", lambda: [
            w for w in http_json("POST", f"{gateway}/query_worker_info", {"instance_id": "all"})
            .get("worker_infos", []) if w["instance_id"] == INSTANCE_ID], proc_logs=logs)

        # Raw KV in, through the agent's own API (as an engine's connector does).
        tokens = list(range(1000, 1000 + NUM_TOKENS))
        kv = np.random.default_rng(0).standard_normal(KV_SHAPE).astype("<f2")
        with grpc.insecure_channel(f"127.0.0.1:{agent_port}") as channel:
            put = agent_pb2_grpc.InstanceAgentStub(channel).PutChunks(agent_pb2.PutChunksRequest(
                location=LOCATION, tokens=tokens,
                kv=common_pb2.Tensor(dtype="float16", shape=list(KV_SHAPE), data=kv.tobytes())), timeout=30)
        assert put.chunks_stored == NUM_CHUNKS and put.num_tokens == NUM_TOKENS, put
        # The controller learns the chunks from the agent's admit reports: compress once it sees them.
        poll("the controller's index holds the chunks", lambda: [
            m for m in http_json("POST", f"{gateway}/lookup", {"tokens": tokens}).get("matches", [])
            if m["instance_id"] == INSTANCE_ID and m["location"] == LOCATION
            and m["num_tokens"] == NUM_TOKENS], proc_logs=logs)
        answer = http_json("POST", f"{gateway}/compress", {"instance_id": INSTANCE_ID, "method": METHOD,
                                                          "location": LOCATION, "tokens": tokens})
        assert answer["num_tokens"] == NUM_TOKENS, answer
        event = poll("the compress event ends", lambda: (lambda e: e if e.get("status") in (
            "COMPLETED", "FAILED", "CANCELLED") else None)(
            http_json("GET", f"{gateway}/events/{answer['event_id']}")["event"]), proc_logs=logs)
        assert event["status"] == "COMPLETED", event
        yield Mesh(http_port, grpc_port, agent_port, metrics_port, tmp, env, event, tokens)


@dataclass
class Prometheus:
    """A real Prometheus server on loopback, scraping the mesh with deploy/prometheus's config."""

    url: str
    config: dict

    def query(self, expr: str) -> list[dict]:
        q = urllib.parse.urlencode({"query": expr})
        answer = http_json("GET", f"{self.url}/api/v1/query?{q}")
        if answer.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {answer}")
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` now (None when it has no series yet)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} gave {len(result)} series: {result}"
        return float(result[0]["value"][1])


def prometheus_config(targets: dict[str, list[str]], rules: Path) -> dict:
    """deploy/prometheus/prometheus.yml pointed at ``targets`` (job -> host:port), scraping every
    second; jobs not in ``targets`` are dropped."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    missing = set(targets) - set(jobs)
    assert not missing, f"prometheus.yml has no job {missing}"
    config["scrape_configs"] = [{**jobs[name], "static_configs": [{"targets": hosts}]}
                                for name, hosts in targets.items()]
    return config


@pytest.fixture(scope="session")
def prometheus(mesh: Mesh) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    tmp = mesh.tmp / "prometheus"
    tmp.mkdir()
    config = prometheus_config({"kvmesh-controller": [f"127.0.0.1:{mesh.http_port}"],
                                "kvmesh-agent": [f"127.0.0.1:{mesh.agent_metrics_port}"]},
                               DEPLOY / "prometheus" / "alerts.yml")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with running([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], log=log) as proc:
        wait_http_ok(f"http://127.0.0.1:{port}/-/ready", timeout=DEADLINE_S, proc=proc)
        yield Prometheus(f"http://127.0.0.1:{port}", config)
