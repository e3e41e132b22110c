"""extra_config.cachegen_key_profile: the agent's cachegen levels round keys along the served model's queries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.codecs import QueryProfile, get_codec
from kvmesh.instance_agent.agent import InstanceAgent
from kvmesh.instance_agent.config import ConfigError

from .conftest import CPU, make_config, make_kv, stub_for
from .test_service import collect, get, put


def profile_file(tmp_path, layers: int = 3, heads: int = 2, dim: int = 8):
    g = np.random.default_rng(0)
    a = g.standard_normal((layers, heads, dim, 2)) * 3
    moments = a @ np.swapaxes(a, 2, 3) + 0.1 * np.eye(dim)
    return QueryProfile(moments).save(tmp_path / "queries.npz")


async def test_compress_uses_the_configured_profile(agents, tmp_path) -> None:
    path = profile_file(tmp_path)
    agent = await agents(make_config(tmp_path, chunk_size=16, extra_config={"cachegen_key_profile": str(path)}))
    assert agent.codecs.get("cachegen").key_profile.fingerprint() == QueryProfile.load(path).fingerprint()
    assert agent.codecs.get("int8") is not None  # methods without the option are made as before
    channel, stub = stub_for(agent)
    try:
        tokens = list(range(500, 532))
        kv = make_kv(len(tokens), layers=3, channels=16, seed=4)
        await put(stub, tokens, kv, CPU)
        msgs = await collect(stub.Compress(agent_pb2.CompressRequest(method="cachegen", location=CPU, tokens=tokens)))
        assert msgs[-1].final and msgs[-1].error == "" and msgs[-1].chunks_done == 2
        n, got = await get(stub, tokens, CPU)
        profiled = get_codec("cachegen", backend="cpu", key_profile=path)
        plain = get_codec("cachegen", backend="cpu")
        first = kv[:, :, :16].contiguous()
        assert n == 32 and torch.equal(got[:, :, :16], profiled.decode(profiled.encode(first)))
        assert not torch.equal(got[:, :, :16], plain.decode(plain.encode(first)))
    finally:
        await channel.close()


@pytest.mark.parametrize("content", [None, b"garbage"])
def test_a_bad_profile_path_is_a_config_error(tmp_path, content) -> None:
    path = tmp_path / "queries.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="cachegen_key_profile"):
        InstanceAgent(make_config(tmp_path, extra_config={"cachegen_key_profile": str(path)}))
