"""extra_config.cachegen_layer_predictor: the agent's cachegen levels code each layer against the
served model's cross-layer prediction, and read those chunks back."""
from __future__ import annotations

import pytest
import torch

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.codecs import LayerPredictor, get_codec
from kvmesh.instance_agent.agent import InstanceAgent
from kvmesh.instance_agent.config import ConfigError
from tests.codecs.test_layer_prediction import random_predictor

from .conftest import CPU, make_config, make_kv, stub_for
from .test_service import collect, get, put


async def test_compress_and_decompress_use_the_configured_predictor(agents, tmp_path) -> None:
    path = random_predictor(layers=3, channels=16, seed=2).save(tmp_path / "layers.npz")
    agent = await agents(make_config(tmp_path, chunk_size=16, extra_config={"cachegen_layer_predictor": str(path)}))
    assert agent.codecs.get("cachegen").predictor.ident == LayerPredictor.load(path).ident
    channel, stub = stub_for(agent)
    try:
        tokens = list(range(700, 732))
        kv = make_kv(len(tokens), layers=3, channels=16, seed=6)
        await put(stub, tokens, kv, CPU)
        msgs = await collect(stub.Compress(agent_pb2.CompressRequest(method="cachegen", location=CPU, tokens=tokens)))
        assert msgs[-1].final and msgs[-1].error == "" and msgs[-1].chunks_done == 2
        n, got = await get(stub, tokens, CPU)  # read through the codec, with the predictor
        predicted = get_codec("cachegen", backend="cpu", predictor=path)
        first = kv[:, :, :16].contiguous()
        assert n == 32 and torch.equal(got[:, :, :16], predicted.decode(predicted.encode(first)))
        msgs = await collect(stub.Decompress(agent_pb2.DecompressRequest(location=CPU, tokens=tokens)))
        assert msgs[-1].final and msgs[-1].error == ""
        n, back = await get(stub, tokens, CPU)
        assert n == 32 and torch.equal(back, got)
    finally:
        await channel.close()


@pytest.mark.parametrize("content", [None, b"garbage"])
def test_a_bad_predictor_path_is_a_config_error(tmp_path, content) -> None:
    path = tmp_path / "layers.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="cachegen_layer_predictor"):
        InstanceAgent(make_config(tmp_path, extra_config={"cachegen_layer_predictor": str(path)}))
