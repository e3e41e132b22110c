"""``kvmesh-serve`` and the served model's codec files: ``--model-files DIR`` holding them is used (the
embedded agent reports and compresses with them, nothing is made), ``--no-model-files`` turns them
off, and the config decides which model's files are looked up."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.codecs import LayerPredictor, QueryProfile, model_files
from kvmesh.codecs.model_files import model_key, save_model_files
from kvmesh.engine.__main__ import parse_args, with_model_files
from kvmesh.instance_agent.config import AgentConfig
from tests.engine.serving import MODEL, kvmesh_serve
from tests.support import free_port

# SmolLM2-135M's KV: 30 layers, 3 KV heads of 64 channels.
LAYERS, HEADS, HEAD_DIM = 30, 3, 64
CHANNELS = HEADS * HEAD_DIM
PROMPT = "kvmesh keeps the KV cache of long prompts in chunks and compresses them on command. " * 3


def smollm2_shaped_files(root: Path) -> LayerPredictor:
    """Files of SmolLM2's shapes, made in a moment (not calibrated: a plain profile, a predictor that
    predicts half the mean of the layers before); returns the predictor."""
    a = np.random.default_rng(1).standard_normal((LAYERS, HEADS, HEAD_DIM, 8))
    c = CHANNELS
    predictor = LayerPredictor(np.full((LAYERS - 1, 2 * c, c), 0.5 / (2 * c), np.float32),
                               np.zeros((LAYERS - 1, c), np.float32),
                               np.full((LAYERS - 1, 3 * c, c), 0.5 / (3 * c), np.float32),
                               np.zeros((LAYERS - 1, c), np.float32))
    save_model_files(MODEL, QueryProfile(a @ np.swapaxes(a, 2, 3) + np.eye(HEAD_DIM)), {"default": predictor},
                     root=root)
    return predictor


def complete(url: str, max_tokens: int = 8) -> dict:
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_serve_uses_the_files_of_model_files_dir(tmp_path: Path) -> None:
    root = tmp_path / "model-files"
    predictor = smollm2_shaped_files(root)
    before = sorted(p.name for p in (root / model_key(MODEL)).iterdir())
    port = free_port()
    with kvmesh_serve(tmp_path, ["--model-files", str(root)], env={"LMCACHE_LMCACHE_WORKER_PORTS": str(port)}) as url:
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            stub = agent_pb2_grpc.InstanceAgentStub(channel)
            assert list(stub.Health(agent_pb2.HealthRequest(), timeout=30).model_files) == [
                f"layer_predictor:{predictor.ident.hex()}"]
            first = complete(url)  # stores the prompt's chunks
            tokens = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"{url}/tokenize", data=json.dumps({"model": MODEL, "prompt": PROMPT}).encode(),
                headers={"Content-Type": "application/json"}), timeout=60).read())["tokens"]
            final = list(stub.Compress(agent_pb2.CompressRequest(tokens=tokens, method="cachegen",
                                                                 location="LocalCPUBackend"), timeout=300))[-1]
            assert final.chunks_done >= 1 and not final.error, final
            again = complete(url)  # loads the compressed chunks, decoded with the same predictor
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert len(again["choices"][0]["text"]) > 0 and len(first["choices"][0]["text"]) > 0
    log = (tmp_path / "engine.log").read_text()
    assert f"codec files of model '{MODEL}' from {root / model_key(MODEL)}" in log
    assert "making them once" not in log
    assert sorted(p.name for p in (root / model_key(MODEL)).iterdir()) == before  # used, not remade


@pytest.mark.slow
def test_no_model_files_turns_them_off(tmp_path: Path) -> None:
    root = tmp_path / "model-files"
    smollm2_shaped_files(root)
    port = free_port()
    env = {"LMCACHE_LMCACHE_WORKER_PORTS": str(port), model_files.ENV_MODEL_FILES: str(root)}
    with kvmesh_serve(tmp_path, ["--no-model-files"], env=env):
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            health = agent_pb2_grpc.InstanceAgentStub(channel).Health(agent_pb2.HealthRequest(), timeout=30)
    assert list(health.model_files) == []
    assert "codec files" not in (tmp_path / "engine.log").read_text()


def test_the_config_decides_which_models_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No model is loaded here: each case returns before any file would be made."""
    off = with_model_files(parse_args(["--no-model-files"]), AgentConfig(model="a/b"), None, None)
    assert off.model is None
    other = with_model_files(parse_args(["--model-files", str(tmp_path)]), AgentConfig(model="other/model"),
                             None, None)
    assert other.model == "other/model" and other.model_files == str(tmp_path)
    assert "names model 'other/model', the engine serves" in caplog.text
