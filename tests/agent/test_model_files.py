"""The config's ``model`` / ``model_files`` keys: the agent looks the served model's codec files up by
its name (kvmesh.codecs.model_files), compresses with them, reports them, and starts without them
(saying how to make them) when the model has none."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.codecs import LayerPredictor, QueryProfile, get_codec, model_files
from kvmesh.codecs.model_files import model_key, save_model_files
from kvmesh.instance_agent.config import config_from_dict, load_config
from kvmesh.instance_agent.methods import required_files
from tests.support import console_script, free_port, running, wait_grpc_healthy

from .conftest import CPU, make_config, make_kv, stub_for
from .test_service import collect, get, put

MODEL = "example-org/Tiny-LM"
LAYERS, CHANNELS, HEAD = 3, 16, 8
TOKENS = list(range(700, 732))


def _profile() -> QueryProfile:
    a = np.random.default_rng(0).standard_normal((LAYERS, CHANNELS // HEAD, HEAD, 2 * HEAD))
    return QueryProfile(a @ np.swapaxes(a, 2, 3) + 0.1 * np.eye(HEAD))


def _predictor(scale: float) -> LayerPredictor:
    """A small fitted-shape predictor: every layer predicted as a scaled mean of the layers before."""
    c = CHANNELS
    return LayerPredictor(np.full((LAYERS - 1, 2 * c, c), scale / (2 * c), np.float32),
                          np.zeros((LAYERS - 1, c), np.float32),
                          np.full((LAYERS - 1, 3 * c, c), scale / (3 * c), np.float32),
                          np.zeros((LAYERS - 1, c), np.float32))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No model files but the test's own: an empty cache folder, no $KVMESH_MODEL_FILES."""
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(model_files.ENV_MODEL_FILES, raising=False)


@pytest.fixture
def files_root(tmp_path: Path) -> Path:
    root = tmp_path / "model-files"
    save_model_files(MODEL, _profile(), {"default": _predictor(0.5), "hq": _predictor(0.25)}, root=root)
    return root


def test_model_keys_parse_from_yaml_and_the_environment(tmp_path: Path) -> None:
    cfg = config_from_dict({"model": MODEL, "model_files": "~/mf"}, env={})
    assert cfg.model == MODEL and cfg.model_files == "~/mf" and cfg.unknown_keys == []
    assert cfg.model_file_roots()[0] == Path("~/mf").expanduser()
    assert cfg.model_file_roots()[-1] == tmp_path / "cache" / "model-files"  # the cache folder: searched last
    path = tmp_path / "agent.yaml"
    path.write_text("chunk_size: 16\nmodel: other/model\n")
    cfg = load_config(path, env={"LMCACHE_MODEL": MODEL, "LMCACHE_MODEL_FILES": str(tmp_path)})
    assert cfg.model == MODEL and cfg.model_files == str(tmp_path)
    assert config_from_dict({}, env={}).codec_options(["cachegen", "int8"]) == {"cachegen": {}}


async def test_the_models_files_are_found_used_and_reported(agents, files_root: Path) -> None:
    agent = await agents(make_config(None, chunk_size=16, model=MODEL, model_files=str(files_root)))
    default, hq = _predictor(0.5).ident.hex(), _predictor(0.25).ident.hex()
    assert agent.codecs.get("cachegen").predictor.ident.hex() == default
    assert agent.codecs.get("cachegen-hq").predictor.ident.hex() == hq  # the level's own fit
    assert agent.codecs.get("cachegen").key_profile.fingerprint() == _profile().fingerprint()
    held = [f"layer_predictor:{default}", f"layer_predictor:{hq}"]
    assert sorted(agent.model_files()) == sorted(held)
    channel, stub = stub_for(agent)
    async with channel:
        assert sorted((await stub.Health(agent_pb2.HealthRequest())).model_files) == sorted(held)
        assert sorted((await stub.Stats(agent_pb2.StatsRequest())).model_files) == sorted(held)
        kv = make_kv(len(TOKENS), layers=LAYERS, channels=CHANNELS, seed=4)
        await put(stub, TOKENS, kv, CPU)
        final = (await collect(stub.Compress(agent_pb2.CompressRequest(method="cachegen", location=CPU,
                                                                      tokens=TOKENS))))[-1]
        assert final.chunks_done == 2 and not final.error
        chunk = agent.locations[CPU].get(agent.spans(TOKENS)[0].key)
        assert required_files("cachegen", chunk.payload) == [f"layer_predictor:{default}"]  # the container names it
        codec = get_codec("cachegen", backend="cpu", **model_files.codec_options(MODEL, "cachegen", [files_root]))
        n, got = await get(stub, TOKENS, CPU)
        assert n == 32 and (got[:, :, :16] == codec.decode(chunk.payload)).all()


async def test_explicit_extra_config_paths_win_over_the_models_files(agents, files_root: Path, tmp_path: Path) -> None:
    mine = _predictor(0.125).save(tmp_path / "mine.npz")
    agent = await agents(make_config(None, chunk_size=16, model=MODEL, model_files=str(files_root),
                                     extra_config={"cachegen_layer_predictor": str(mine)}))
    ident = LayerPredictor.load(mine).ident.hex()
    for method in ("cachegen", "cachegen-hq"):
        assert agent.codecs.get(method).predictor.ident.hex() == ident
    assert agent.codecs.get("cachegen").key_profile.fingerprint() == _profile().fingerprint()  # still the model's
    assert agent.model_files() == [f"layer_predictor:{ident}"]


async def test_the_cache_folder_is_searched_by_default(agents, tmp_path: Path) -> None:
    save_model_files(MODEL, predictors={"default": _predictor(0.5)})  # into $KVMESH_CACHE_DIR/model-files
    agent = await agents(make_config(None, chunk_size=16, model=MODEL))
    assert agent.model_files() == [f"layer_predictor:{_predictor(0.5).ident.hex()}"]
    assert (tmp_path / "cache" / "model-files" / model_key(MODEL) / "layer_predictor.npz").is_file()


async def test_a_model_without_files_starts_and_says_how_to_make_them(agents, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kvmesh.instance_agent.config"):
        agent = await agents(make_config(None, chunk_size=16, model="nobody/no-such-model"))
    assert agent.model_files() == [] and agent.codecs.get("cachegen").predictor is None
    text = caplog.text
    assert "no codec files for model 'nobody/no-such-model'" in text and "kvmesh-model-files nobody/no-such-model" in text


def _agent_process(tmp_path: Path, *flags: str):  # noqa: ANN202 - a context manager from tests.support
    port = free_port()
    env = {"LMCACHE_CONFIG_FILE": "", "LMCACHE_LMCACHE_WORKER_PORTS": str(port), "LMCACHE_CHUNK_SIZE": "16",
           "KVMESH_CACHE_DIR": str(tmp_path / "cache"), "KVMESH_AUTH_TOKEN_FILE": ""}
    env = {k: v for k, v in {**os.environ, **env}.items() if k != model_files.ENV_MODEL_FILES}
    return port, running([console_script("kvmesh-agent"), "--metrics-port", "-1", *flags], env=env,
                         log=tmp_path / "agent.log")


@pytest.mark.slow
def test_kvmesh_agent_flags_name_the_model_and_its_folder(tmp_path: Path, files_root: Path) -> None:
    port, proc = _agent_process(tmp_path, "--model", MODEL, "--model-files", str(files_root))
    with proc:
        wait_grpc_healthy(f"127.0.0.1:{port}", timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = agent_pb2_grpc.InstanceAgentStub(channel).Health(agent_pb2.HealthRequest(), timeout=10)
    assert sorted(health.model_files) == sorted(f"layer_predictor:{_predictor(s).ident.hex()}" for s in (0.5, 0.25))
    assert f"codec files of model '{MODEL}' from {files_root / model_key(MODEL)}" in (tmp_path / "agent.log").read_text()


@pytest.mark.slow
def test_kvmesh_agent_with_a_model_that_has_no_files_serves_and_says_so(tmp_path: Path) -> None:
    port, proc = _agent_process(tmp_path, "--model", "nobody/no-such-model")
    with proc:
        wait_grpc_healthy(f"127.0.0.1:{port}", timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = agent_pb2_grpc.InstanceAgentStub(channel).Health(agent_pb2.HealthRequest(), timeout=10)
    assert health.error_code == 0 and list(health.model_files) == []
    log = (tmp_path / "agent.log").read_text()
    assert "no codec files for model 'nobody/no-such-model'" in log and "kvmesh-model-files" in log


def test_an_engines_model_name_finds_its_files(tmp_path: Path, files_root: Path, caplog) -> None:
    """The vLLM connector's part (engine_agent_config; the connector itself needs vllm): vLLM's model
    name, as given to `vllm serve`, looks the files up; the config's model and the connector's extra
    config override it."""
    from kvmesh.instance_agent.config import engine_agent_config

    plain = make_config(None, model_files=str(files_root))
    cfg = engine_agent_config(plain, MODEL)
    assert cfg.model == MODEL and cfg.find_model_files().folder == files_root / model_key(MODEL)
    local = "/srv/models/Tiny-LM"  # a local path is a name too: kvmesh-model-files makes its files the same way
    save_model_files(local, predictors={"default": _predictor(0.5)}, root=files_root)
    assert engine_agent_config(plain, local).find_model_files().folder == files_root / "--srv--models--Tiny-LM"
    named = engine_agent_config(make_config(None, model=MODEL, model_files=str(files_root)), local)
    assert named.model == MODEL and "names model" in caplog.text  # the config's own key wins, with a warning
    other = tmp_path / "elsewhere"
    save_model_files("alias", predictors={"default": _predictor(0.25)}, root=other)
    over = engine_agent_config(plain, MODEL, {"kvmesh_model": "alias", "kvmesh_model_files": str(other)})
    assert over.model == "alias" and over.find_model_files().folder == other / "alias"
    assert engine_agent_config(plain, None).model is None
