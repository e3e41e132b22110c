"""EmbeddedAgent: the library form an engine runs in its own process, called from several threads."""
from __future__ import annotations

import concurrent.futures
from pathlib import Path

import grpc
import pytest
import torch

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.errors import InvalidArgument
from kvmesh.instance_agent.agent import EmbeddedAgent
from kvmesh.instance_agent.tensors import from_proto

from .conftest import CPU, DISK, make_config, make_kv


def test_store_lookup_retrieve_from_threads(tmp_path: Path) -> None:
    with EmbeddedAgent(make_config(tmp_path), worker_id=0, metrics_port=0) as agent:
        assert agent.grpc_port and agent.metrics_port

        def work(i: int) -> None:
            tokens = [i * 1000 + t for t in range(10)]
            kv = make_kv(10, seed=i)
            assert agent.store(tokens, kv) == 10
            assert agent.store(tokens, kv) == 0, "already stored"
            assert agent.lookup(tokens) == 10
            n, got = agent.retrieve(tokens)
            assert n == 10 and torch.equal(got, kv)
            # A longer sequence shares the full chunks only: the partial one hashed other tokens.
            n, got = agent.retrieve(tokens + [1, 2])
            assert n == 8 and torch.equal(got, kv[:, :, :8])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(8)))

        assert agent.retrieve([5, 5, 5]) == (0, None)
        other = list(range(90000, 90006))
        assert agent.store(other, make_kv(6), location=DISK) == 6
        assert agent.lookup(other, location=CPU) == 0
        assert agent.lookup(other, location=DISK) == 6
        assert agent.lookup(other) == 6

        # The same agent answers over gRPC, and sees what the engine stored.
        with grpc.insecure_channel(f"localhost:{agent.grpc_port}") as channel:
            stub = agent_pb2_grpc.InstanceAgentStub(channel)
            resp = stub.GetChunks(agent_pb2.GetChunksRequest(tokens=[3000 + t for t in range(10)]))
            assert resp.num_tokens == 10 and torch.equal(from_proto(resp.kv), make_kv(10, seed=3))
            list(stub.Compress(agent_pb2.CompressRequest(method="lossless", location=CPU,
                                                         tokens=[3000 + t for t in range(10)])))
        n, got = agent.retrieve([3000 + t for t in range(10)])
        assert n == 10 and torch.equal(got, make_kv(10, seed=3)), "encoded chunks are decoded on the way out"

        with pytest.raises(InvalidArgument, match="dim 2"):
            agent.store([1, 2, 3], make_kv(4))
        with pytest.raises(InvalidArgument, match="unknown location"):
            agent.lookup([1], location="Nowhere")


def test_start_failure_is_raised(tmp_path: Path) -> None:
    with EmbeddedAgent(make_config(tmp_path), metrics_port=0) as first:
        taken = first.grpc_port
        second = EmbeddedAgent(make_config(tmp_path / "2", lmcache_worker_ports=[taken]), metrics_port=0)
        with pytest.raises(Exception, match=str(taken)):
            second.start(timeout=30)


def test_stop_is_idempotent_and_calls_after_stop_fail(tmp_path: Path) -> None:
    agent = EmbeddedAgent(make_config(tmp_path), metrics_port=-1)
    agent.start()
    agent.stop()
    agent.stop()
    with pytest.raises(RuntimeError, match="not started"):
        agent.lookup([1])
