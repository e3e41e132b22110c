"""The agent's /metrics: scraped over HTTP and parsed; names as in docs/CONTRACTS.md."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.instance_agent.tensors import to_proto

from .conftest import CPU, make_kv


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_metrics_follow_operations(agent, stub) -> None:
    tokens = list(range(12))
    await stub.PutChunks(agent_pb2.PutChunksRequest(location=CPU, tokens=tokens, kv=to_proto(make_kv(12))))
    m = scrape(agent.metrics_port)
    assert value(m["kvmesh_agent_stored_chunks"], "kvmesh_agent_stored_chunks", location=CPU, form="raw") == 3
    used_raw = value(m["kvmesh_agent_storage_used_bytes"], "kvmesh_agent_storage_used_bytes", location=CPU)
    assert used_raw == 3 * 2 * 3 * 4 * 16 * 2
    assert value(m["kvmesh_agent_storage_capacity_bytes"], "kvmesh_agent_storage_capacity_bytes",
                 location=CPU) == agent.config.max_local_cpu_bytes

    [msg async for msg in stub.Compress(agent_pb2.CompressRequest(method="int8", location=CPU, tokens=tokens))]
    [msg async for msg in stub.Compress(agent_pb2.CompressRequest(method="int8", location=CPU, tokens=tokens))]
    m = scrape(agent.metrics_port)
    chunks = m["kvmesh_agent_chunks"]
    assert value(chunks, "kvmesh_agent_chunks_total", operation="compress", method="int8", location=CPU,
                 outcome="ok") == 3
    assert value(chunks, "kvmesh_agent_chunks_total", operation="compress", method="int8", location=CPU,
                 outcome="skipped") == 3
    assert value(m["kvmesh_agent_stored_chunks"], "kvmesh_agent_stored_chunks", location=CPU, form="encoded") == 3
    inp = value(m["kvmesh_agent_codec_input_bytes"], "kvmesh_agent_codec_input_bytes_total",
                operation="compress", method="int8")
    out = value(m["kvmesh_agent_codec_output_bytes"], "kvmesh_agent_codec_output_bytes_total",
                operation="compress", method="int8")
    assert inp == used_raw and 0 < out
    assert value(m["kvmesh_agent_storage_used_bytes"], "kvmesh_agent_storage_used_bytes", location=CPU) == out
    assert value(m["kvmesh_agent_codec_seconds"], "kvmesh_agent_codec_seconds_count",
                 operation="compress", method="int8") == 3
    assert value(m["kvmesh_agent_compression_ratio"], "kvmesh_agent_compression_ratio_count", method="int8") == 3
    assert value(m["kvmesh_agent_compression_ratio"], "kvmesh_agent_compression_ratio_sum", method="int8") > 0
    assert value(m["kvmesh_agent_controller_connected"], "kvmesh_agent_controller_connected") == 0
    assert "kvmesh_agent_evictions" in m


async def test_evictions_are_counted(agents, tmp_path) -> None:
    from .conftest import make_config, stub_for

    agent = await agents(make_config(tmp_path, max_local_cpu_size=2 * 768 / (1 << 30)))
    channel, stub = stub_for(agent)
    async with channel:
        for base in (0, 100):  # two sequences of two chunks: the second evicts the first (tail first)
            await stub.PutChunks(agent_pb2.PutChunksRequest(location=CPU, tokens=list(range(base, base + 8)),
                                                            kv=to_proto(make_kv(8))))
    m = scrape(agent.metrics_port)
    assert value(m["kvmesh_agent_evictions"], "kvmesh_agent_evictions_total", location=CPU) == 2


async def test_two_agents_in_one_process_have_their_own_series(agents, tmp_path) -> None:
    from .conftest import make_config

    a = await agents(make_config(tmp_path / "a"))
    b = await agents(make_config(tmp_path / "b", max_local_cpu_size=1.0))
    assert a.metrics_port != b.metrics_port
    cap = lambda port: value(scrape(port)["kvmesh_agent_storage_capacity_bytes"],  # noqa: E731
                             "kvmesh_agent_storage_capacity_bytes", location=CPU)
    assert cap(a.metrics_port) == a.config.max_local_cpu_bytes
    assert cap(b.metrics_port) == 1 << 30


async def test_negative_metrics_port_disables_metrics(agents) -> None:
    agent = await agents(metrics_port=-1)
    assert agent.metrics_port is None
