"""The agent with cachegen on a CUDA GPU (the Triton backend): chunks stay host-side, reads decode.

Skipped without a GPU (there the CPU backend of the same codec is tested by test_service.py).
"""
from __future__ import annotations

import pytest
import torch

from kvmesh.codecs import get_codec
from kvmesh.instance_agent.keys import chunk_spans

from .conftest import CPU, DISK, make_config, make_kv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for cachegen's Triton backend")]


@pytest.mark.parametrize("location", [CPU, DISK])
async def test_cachegen_on_the_gpu_through_the_agent(agents, tmp_path, location: str) -> None:
    agent = await agents(make_config(tmp_path, chunk_size=64, max_local_cpu_size=0.1, max_local_disk_size=0.1))
    tokens = list(range(150))
    kv = make_kv(150, layers=4, channels=64, seed=1)
    # The engine's KV may live on the GPU; stored chunks are host copies either way.
    assert await agent.store(tokens, kv.cuda(), location) == 150
    msgs = [m async for m in await agent.compress(tokens, "cachegen", location)]
    assert msgs[-1].error == "" and msgs[-1].chunks_done == 3
    assert msgs[-1].bytes_after < msgs[-1].bytes_before
    n, got = await agent.retrieve(tokens, location)
    assert n == 150 and got.device.type == "cpu" and got.dtype == kv.dtype

    gpu, cpu = get_codec("cachegen", backend="triton"), get_codec("cachegen", backend="cpu")
    for span in chunk_spans(tokens, 64):
        chunk = kv[:, :, span.start:span.end].contiguous()
        blob = gpu.encode(chunk)
        assert blob == cpu.encode(chunk), f"chunk {span.index}: Triton and CPU containers differ"
        assert torch.equal(got[:, :, span.start:span.end], gpu.decode(blob).cpu()), f"chunk {span.index}"

    msgs = [m async for m in await agent.decompress(tokens, "cachegen", location)]
    assert msgs[-1].error == "" and msgs[-1].chunks_done == 3
    n, raw = await agent.retrieve(tokens, location)
    assert n == 150 and raw.device.type == "cpu" and torch.equal(raw, got)
