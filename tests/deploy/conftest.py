"""Session fixtures of the deploy tests: a real mesh (``kvmesh-controller``, ``kvmesh-agent`` and an
embedded engine, ``kvmesh-serve``, as processes started through the images' entrypoint,
deploy/docker/entrypoint.sh; raw KV put into the agent; one compress through the controller's HTTP
gateway) and a real Prometheus server scraping it with deploy/prometheus's config and rules. One of
each per session: the machine is small."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import yaml

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.api.common.v1 import common_pb2
from tests.deploy.deploy_support import DEPLOY, tool
from tests.deploy.mesh import (AUTH, CHUNK_SIZE, DEADLINE_S, ENGINE_ID, INSTANCE_ID, KV_SHAPE, LOCATION,
                               METHOD, NUM_CHUNKS, NUM_TOKENS, TOKEN, EngineRun, Mesh, Prometheus, http_json,
                               poll, prometheus_config, scrape)
from tests.engine.serving import served_model_files
from tests.support import VENV_BIN, free_port, running, wait_grpc_healthy, wait_http_ok

ENDED = ("COMPLETED", "FAILED", "CANCELLED")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mesh")
    served_model_files()  # the engine's codec files, made once per environment (not within its start deadline)
    http_port, grpc_port, agent_port, metrics_port = (free_port() for _ in range(4))
    config = tmp / "lmcache.yaml"
    config.write_text(yaml.safe_dump({
        "chunk_size": CHUNK_SIZE, "local_cpu": True, "max_local_cpu_size": 0.05,
        "enable_controller": True, "lmcache_instance_id": INSTANCE_ID,
        "controller_pull_url": f"127.0.0.1:{grpc_port}", "lmcache_worker_ports": agent_port,
        "p2p_host": "127.0.0.1", "p2p_init_ports": 0,
    }))
    # Every process reads the shared token from the file KVMESH_AUTH_TOKEN_FILE names, as the
    # deployments set it (TLS stays off here: test_deploy_tls covers the controller's HTTPS scrape).
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    # The entrypoint runs `kvmesh-<role>` from PATH, as in the image; TMPDIR keeps its role note here.
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": str(tmp),
           "LMCACHE_CONFIG_FILE": str(config), "KVMESH_AUTH_TOKEN_FILE": str(token_file)}
    entrypoint = ["sh", str(DEPLOY / "docker" / "entrypoint.sh")]
    logs = [tmp / "controller.log", tmp / "agent.log"]
    with contextlib.ExitStack() as stack:
        controller = stack.enter_context(running(
            [*entrypoint, "controller", "--host", "127.0.0.1", "--port", str(http_port),
             "--monitor-port", str(grpc_port), "--health-check-interval", "0.5"], env=env, log=logs[0]))
        agent = stack.enter_context(running(
            [*entrypoint, "agent", "--metrics-port", str(metrics_port)], env=env, log=logs[1]))
        # An embedded engine as compose.yaml runs it (its lmcache.yaml, per-engine LMCACHE_<KEY>
        # overrides, moved off the fixed ports). Loading the model takes a while: it starts now, beside
        # everything else, and only test_deploy_engine waits for it; its agent registers once it is up.
        engine = EngineRun(port=free_port(), agent_port=free_port(), log=tmp / "engine.log")
        engine_env = {**env, "LMCACHE_CONFIG_FILE": str(DEPLOY / "compose" / "lmcache.yaml"),
                      "LMCACHE_LMCACHE_INSTANCE_ID": ENGINE_ID, "LMCACHE_P2P_HOST": "127.0.0.1",
                      "LMCACHE_CONTROLLER_PULL_URL": f"127.0.0.1:{grpc_port}",
                      "LMCACHE_LMCACHE_WORKER_PORTS": str(engine.agent_port), "LMCACHE_P2P_INIT_PORTS": "0"}
        engine.proc = stack.enter_context(running(
            [*entrypoint, "serve", "--host", "127.0.0.1", "--port", str(engine.port), "--threads", "1"],
            env=engine_env, log=engine.log))
        # Readiness on the open routes (the gRPC health service, the controller's /healthz); then the
        # agent's /metrics, with the token.
        wait_grpc_healthy(f"127.0.0.1:{grpc_port}", timeout=DEADLINE_S)
        wait_http_ok(f"http://127.0.0.1:{http_port}/healthz", timeout=DEADLINE_S, proc=controller)
        wait_grpc_healthy(f"127.0.0.1:{agent_port}", timeout=DEADLINE_S)
        poll("the agent serves /metrics", lambda: scrape(metrics_port), proc_logs=logs[1:])
        gateway = f"http://127.0.0.1:{http_port}"

        def registered() -> list[dict]:
            infos = http_json("POST", f"{gateway}/query_worker_info", {"instance_id": "all"}).get("worker_infos", [])
            return [w for w in infos if w["instance_id"] == INSTANCE_ID]

        poll("the agent registers with the controller", registered, proc_logs=logs)

        # Raw KV in, through the agent's own API (as an engine's connector does).
        tokens = list(range(1000, 1000 + NUM_TOKENS))
        kv = np.random.default_rng(0).standard_normal(KV_SHAPE).astype("<f2")
        with grpc.insecure_channel(f"127.0.0.1:{agent_port}") as channel:
            put = agent_pb2_grpc.InstanceAgentStub(channel).PutChunks(agent_pb2.PutChunksRequest(
                location=LOCATION, tokens=tokens,
                kv=common_pb2.Tensor(dtype="float16", shape=list(KV_SHAPE), data=kv.tobytes())), timeout=30,
                metadata=(("authorization", AUTH["Authorization"]),))
        assert put.chunks_stored == NUM_CHUNKS and put.num_tokens == NUM_TOKENS, put

        # The controller learns the chunks from the agent's admit reports: compress once it sees them.
        def indexed() -> list[dict]:
            matches = http_json("POST", f"{gateway}/lookup", {"tokens": tokens}).get("matches", [])
            return [m for m in matches if m["instance_id"] == INSTANCE_ID and m["location"] == LOCATION
                    and m["num_tokens"] == NUM_TOKENS]

        poll("the controller's index holds the chunks", indexed, proc_logs=logs)
        answer = http_json("POST", f"{gateway}/compress", {"instance_id": INSTANCE_ID, "method": METHOD,
                                                          "location": LOCATION, "tokens": tokens})
        assert answer["num_tokens"] == NUM_TOKENS, answer

        def ended() -> dict | None:
            event = http_json("GET", f"{gateway}/events/{answer['event_id']}")["event"]
            return event if event.get("status") in ENDED else None

        event = poll("the compress event ends", ended, proc_logs=logs)
        assert event["status"] == "COMPLETED", event
        yield Mesh(http_port, grpc_port, agent_port, metrics_port, tmp, env, token_file, event, tokens, engine)


@pytest.fixture(scope="session")
def prometheus(mesh: Mesh) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    tmp = mesh.tmp / "prometheus"
    tmp.mkdir()
    # Beside the real agent, an agent that is down (nothing listens there): the alert rules see it.
    dead_agent = f"127.0.0.1:{free_port()}"
    config = prometheus_config({"kvmesh-controller": [f"127.0.0.1:{mesh.http_port}"],
                                "kvmesh-agent": [f"127.0.0.1:{mesh.agent_metrics_port}", dead_agent]},
                               DEPLOY / "prometheus" / "alerts.yml", {"/run/secrets/kvmesh-token": mesh.token_file})
    # This mesh's controller serves plain HTTP (test_deploy_tls scrapes one over mutual TLS with the
    # job as written): keep the job's token, drop its TLS.
    controller_job = next(j for j in config["scrape_configs"] if j["job_name"] == "kvmesh-controller")
    assert controller_job.pop("scheme") == "https" and controller_job.pop("tls_config")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with running([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], log=log) as proc:
        wait_http_ok(f"http://127.0.0.1:{port}/-/ready", timeout=DEADLINE_S, proc=proc)
        yield Prometheus(f"http://127.0.0.1:{port}", config, dead_agent)
