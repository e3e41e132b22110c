"""Two ``kvmesh-agent`` processes share one real redis-server (issue 14.5): one stores, the other
finds and reads; an agent SIGKILLed mid-compress on the remote store loses nothing."""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.instance_agent.agent import GRPC_OPTIONS
from kvmesh.instance_agent.keys import chunk_spans
from kvmesh.instance_agent.tensors import from_proto, to_proto
from tests.agent.redis_server import RedisServer, redis_server
from tests.support import console_script, free_port, running, wait_grpc_healthy

REMOTE = "RemoteBackend"
CHUNK = 16


@pytest.fixture
def redis_srv(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def agent_yaml(path: Path, server: RedisServer, name: str) -> str:
    port = free_port()
    path.write_text(yaml.safe_dump({
        "chunk_size": CHUNK, "local_cpu": True, "max_local_cpu_size": 0.2, "remote_url": server.url,
        "remote_serde": "naive", "lmcache_instance_id": name, "lmcache_worker_ports": port,
        "enable_controller": False, "extra_config": {"remote_key_prefix": "it:"}}))
    return f"127.0.0.1:{port}"


def make_kv(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, n, 64, generator=g).to(torch.float16)


def agent_args(cfg: Path) -> list[str]:
    return [console_script("kvmesh-agent"), "--config", str(cfg), "--metrics-port", "-1"]


def test_one_agent_stores_the_other_finds_and_reads(tmp_path: Path, redis_srv: RedisServer) -> None:
    target_a = agent_yaml(tmp_path / "a.yaml", redis_srv, "inst_a")
    target_b = agent_yaml(tmp_path / "b.yaml", redis_srv, "inst_b")
    tokens = list(range(5 * CHUNK))
    kv = make_kv(len(tokens), 1)
    with running(agent_args(tmp_path / "a.yaml"), log=tmp_path / "a.log"), \
            running(agent_args(tmp_path / "b.yaml"), log=tmp_path / "b.log"):
        wait_grpc_healthy(target_a, timeout=60)
        wait_grpc_healthy(target_b, timeout=60)
        with grpc.insecure_channel(target_a, options=GRPC_OPTIONS) as ca, \
                grpc.insecure_channel(target_b, options=GRPC_OPTIONS) as cb:
            a, b = agent_pb2_grpc.InstanceAgentStub(ca), agent_pb2_grpc.InstanceAgentStub(cb)
            put = a.PutChunks(agent_pb2.PutChunksRequest(location=REMOTE, tokens=tokens, kv=to_proto(kv)), timeout=60)
            assert put.chunks_stored == 5
            look = b.Lookup(agent_pb2.LookupRequest(tokens=tokens), timeout=30)
            assert {m.location: m.num_tokens for m in look.matches} == {"LocalCPUBackend": 0, REMOTE: len(tokens)}
            got = b.GetChunks(agent_pb2.GetChunksRequest(tokens=tokens), timeout=60)  # local miss -> remote
            assert got.num_tokens == len(tokens) and torch.equal(from_proto(got.kv), kv)
            # What B compresses in place, A reads back.
            final = list(b.Compress(agent_pb2.CompressRequest(method="cachegen", location=REMOTE, tokens=tokens),
                                    timeout=120))[-1]
            assert final.chunks_done == 5 and final.chunks_failed == 0
            from_b = from_proto(b.GetChunks(agent_pb2.GetChunksRequest(tokens=tokens), timeout=60).kv)
            from_a = from_proto(a.GetChunks(agent_pb2.GetChunksRequest(tokens=tokens, location=REMOTE), timeout=60).kv)
            assert torch.equal(from_a, from_b)


def test_sigkill_mid_compress_on_the_remote_store_loses_nothing(tmp_path: Path, redis_srv: RedisServer) -> None:
    target_a = agent_yaml(tmp_path / "a.yaml", redis_srv, "inst_a")
    target_b = agent_yaml(tmp_path / "b.yaml", redis_srv, "inst_b")
    n_chunks = 96
    tokens = list(range(n_chunks * CHUNK))
    kv = make_kv(len(tokens), 7)
    with running(agent_args(tmp_path / "a.yaml"), log=tmp_path / "a.log") as proc:
        wait_grpc_healthy(target_a, timeout=60)
        with grpc.insecure_channel(target_a, options=GRPC_OPTIONS) as channel:
            stub = agent_pb2_grpc.InstanceAgentStub(channel)
            put = stub.PutChunks(agent_pb2.PutChunksRequest(location=REMOTE, tokens=tokens, kv=to_proto(kv)), timeout=60)
            assert put.chunks_stored == n_chunks
            stream = stub.Compress(agent_pb2.CompressRequest(method="lossless", location=REMOTE, tokens=tokens),
                                   timeout=120)
            assert next(stream).progress.error == ""
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            with pytest.raises(grpc.RpcError):
                for _ in stream:
                    pass
    keys = [f"it:w0:{s.key}".encode() for s in chunk_spans(tokens, CHUNK)]
    forms = [redis_srv.client.hget(k, "m") for k in keys]
    assert all(f in (b"", b"lossless") for f in forms), "every chunk whole, in its old form or its new one"
    encoded = sum(f == b"lossless" for f in forms)
    assert encoded >= 1
    with running(agent_args(tmp_path / "b.yaml"), log=tmp_path / "b.log"):
        wait_grpc_healthy(target_b, timeout=60)
        with grpc.insecure_channel(target_b, options=GRPC_OPTIONS) as channel:
            stub = agent_pb2_grpc.InstanceAgentStub(channel)
            got = stub.GetChunks(agent_pb2.GetChunksRequest(tokens=tokens, location=REMOTE), timeout=60)
            assert got.num_tokens == len(tokens) and torch.equal(from_proto(got.kv), kv)
            # The interrupted compress is simply run again, by any agent.
            msgs = list(stub.Compress(agent_pb2.CompressRequest(method="lossless", location=REMOTE, tokens=tokens),
                                      timeout=120))
            assert msgs[-1].chunks_done == n_chunks and msgs[-1].chunks_failed == 0
            assert sum(m.progress.skipped for m in msgs[:-1]) == encoded
