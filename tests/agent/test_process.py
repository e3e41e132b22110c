"""``kvmesh-agent`` as a real process: the seed's example.yaml, env overrides, SIGTERM, SIGKILL mid-compress."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
import torch

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.instance_agent.agent import GRPC_OPTIONS
from kvmesh.instance_agent.tensors import from_proto, to_proto
from tests.support import REPO, console_script, free_port, running, wait_grpc_healthy

from .conftest import make_kv

pytestmark = pytest.mark.slow
EXAMPLE = REPO / "example.yaml"


def agent_env(port: int, **extra: str) -> dict[str, str]:
    # The seed's file unchanged; the environment moves the ports off the defaults and points the
    # controller link at a port where nothing listens (the agent must serve regardless).
    return {"LMCACHE_CONFIG_FILE": str(EXAMPLE), "LMCACHE_LMCACHE_WORKER_PORTS": str(port),
            "LMCACHE_CONTROLLER_PULL_URL": f"127.0.0.1:{free_port()}", **extra}


def test_example_yaml_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "agent.log"
    with running([console_script("kvmesh-agent"), "--metrics-port", "0"], env=agent_env(port), log=log) as proc:
        wait_grpc_healthy(f"127.0.0.1:{port}", timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = agent_pb2_grpc.InstanceAgentStub(channel)
            stats = stub.Stats(agent_pb2.StatsRequest(), timeout=10)
            assert stats.instance_id == "lmcache_default_instance" and stats.chunk_size == 256
            assert [x.name for x in stats.locations] == ["LocalCPUBackend"]
            assert stats.locations[0].capacity_bytes == 5 << 30
            tokens = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
            stub.PutChunks(agent_pb2.PutChunksRequest(tokens=tokens, kv=to_proto(make_kv(12))), timeout=10)
            assert stub.Health(agent_pb2.HealthRequest(), timeout=10).error_code == 0
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "ready grpc=" in text and "stopping" in text


def test_bad_config_exits_with_an_error_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(EXAMPLE.read_text() + "chunk_size_typo: 3\n")
    env = {**os.environ, "LMCACHE_CHUNK_SIZE": "lots", "LMCACHE_CONFIG_FILE": str(cfg)}
    proc = subprocess.run([console_script("kvmesh-agent")], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert b"LMCACHE_CHUNK_SIZE" in proc.stderr and b"lots" in proc.stderr


def test_sigkill_mid_compress_loses_nothing(tmp_path: Path) -> None:
    """The agent process is killed while it compresses chunks on disk; restarted on the same
    folder, it holds every chunk, each readable and unchanged (a lossless method, so exact)."""
    port = free_port()
    env = agent_env(port, LMCACHE_LOCAL_CPU="false", LMCACHE_LOCAL_DISK=str(tmp_path / "disk"),
                    LMCACHE_MAX_LOCAL_DISK_SIZE="1", LMCACHE_CHUNK_SIZE="16", LMCACHE_ENABLE_CONTROLLER="false")
    tokens = list(range(16 * 24))
    kv = make_kv(len(tokens), layers=4, channels=64, seed=7)
    target = f"127.0.0.1:{port}"
    args = [console_script("kvmesh-agent"), "--metrics-port", "-1"]
    with running(args, env=env, log=tmp_path / "a1.log") as proc:
        wait_grpc_healthy(target, timeout=60)
        with grpc.insecure_channel(target, options=GRPC_OPTIONS) as channel:
            stub = agent_pb2_grpc.InstanceAgentStub(channel)
            put = stub.PutChunks(agent_pb2.PutChunksRequest(location="LocalDiskBackend", tokens=tokens,
                                                            kv=to_proto(kv)), timeout=60)
            assert put.chunks_stored == 24
            stream = stub.Compress(agent_pb2.CompressRequest(method="lossless", location="LocalDiskBackend",
                                                            tokens=tokens), timeout=120)
            first = next(stream)
            assert first.progress.error == ""
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            with pytest.raises(grpc.RpcError):
                for _ in stream:
                    pass
    with running(args, env=env, log=tmp_path / "a2.log"):
        wait_grpc_healthy(target, timeout=60)
        with grpc.insecure_channel(target, options=GRPC_OPTIONS) as channel:
            stub = agent_pb2_grpc.InstanceAgentStub(channel)
            stats = stub.Stats(agent_pb2.StatsRequest(), timeout=10)
            disk = stats.locations[0]
            assert disk.num_chunks == 24 and disk.num_encoded >= 1
            resp = stub.GetChunks(agent_pb2.GetChunksRequest(tokens=tokens), timeout=60)
            assert resp.num_tokens == len(tokens)
            assert torch.equal(from_proto(resp.kv), kv)
            # And the interrupted compress can simply be run again.
            msgs = list(stub.Compress(agent_pb2.CompressRequest(method="lossless", location="LocalDiskBackend",
                                                               tokens=tokens), timeout=120))
            assert msgs[-1].error == "" and msgs[-1].chunks_done == 24
            assert sum(m.progress.skipped for m in msgs[:-1]) == disk.num_encoded
    assert not list((tmp_path / "disk").glob(".tmp-*"))
