"""A model's codec files found by its name (codecs/model_files.py): folders, precedence, options."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kvmesh.codecs import CodecError, LayerPredictor, QueryProfile, get_codec, model_files
from kvmesh.codecs.model_files import codec_options, find_model_files, model_key, save_model_files

from .conftest import kv_like

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
L, C, D = 3, 8, 4


def _profile(seed: int = 0) -> QueryProfile:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((L, C // D, D, 2 * D))
    return QueryProfile(a @ np.swapaxes(a, 2, 3))


def _predictor(scale: float = 0.5) -> LayerPredictor:
    return LayerPredictor(np.full((L - 1, 2 * C, C), scale / (2 * C), np.float32), np.zeros((L - 1, C), np.float32),
                          np.full((L - 1, 3 * C, C), scale / (3 * C), np.float32), np.zeros((L - 1, C), np.float32))


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(model_files.ENV_MODEL_FILES, raising=False)


def test_model_key_is_a_folder_name_never_a_path() -> None:
    assert model_key(MODEL) == "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert model_key("a/../../etc") == "a--..--..--etc"
    with pytest.raises(CodecError, match="no folder name"):
        model_key("..")


def test_no_files_means_no_options(tmp_path) -> None:
    assert find_model_files(MODEL) is None
    assert codec_options(MODEL) == {}
    assert codec_options(MODEL, "lossless") == {}


def test_saved_files_are_found_in_the_cache_and_make_the_codec(tmp_path) -> None:
    p, default, hq = _profile(), _predictor(0.5), _predictor(0.25)
    found = save_model_files(MODEL, p, {"default": default, "hq": hq})
    assert found.folder == tmp_path / "cache" / "model-files" / model_key(MODEL)
    opts = codec_options(MODEL, "cachegen")
    assert opts["key_profile"].order.tolist() == p.order.tolist()
    assert opts["predictor"].ident == default.ident
    assert codec_options(MODEL, "cachegen-hq")["predictor"].ident == hq.ident
    assert codec_options(MODEL, "cachegen-compact")["predictor"].ident == default.ident  # no own fit: the default's
    kv = kv_like(layers=L, tokens=20, channels=C, seed=3)
    codec = get_codec("cachegen", backend="cpu", **opts)
    blob = codec.encode(kv)
    assert get_codec("cachegen", backend="cpu", **codec_options(MODEL)).decode(blob).shape == kv.shape
    with pytest.raises(CodecError, match="predictor"):
        get_codec("cachegen", backend="cpu").decode(blob)  # it was coded with the model's predictor


def test_roots_are_searched_in_order(tmp_path, monkeypatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    save_model_files(MODEL, predictors={"default": _predictor(0.5)}, root=second)
    save_model_files(MODEL, predictors={"default": _predictor(0.25)}, root=first)
    save_model_files(MODEL, key_profile=_profile())  # the cache folder: searched last
    monkeypatch.setenv(model_files.ENV_MODEL_FILES, f"{first}{os.pathsep}{second}")
    found = find_model_files(MODEL)
    assert found is not None and found.folder == first / model_key(MODEL)
    assert found.key_profile is None  # the first folder holding any file wins, whole
    assert find_model_files(MODEL, roots=[second]).folder == second / model_key(MODEL)
    assert find_model_files("another/model") is None


def test_bad_requests_are_clear_errors(tmp_path) -> None:
    with pytest.raises(CodecError, match="needs a query profile, a layer predictor or a schedule"):
        save_model_files(MODEL, root=tmp_path)
    with pytest.raises(CodecError, match="unknown level 'ultra'"):
        save_model_files(MODEL, predictors={"ultra": _predictor()}, root=tmp_path)
    found = save_model_files(MODEL, key_profile=_profile(), root=tmp_path)
    with pytest.raises(CodecError, match="cachegen methods"):
        found.codec_options("int8")
    (found.folder / "query_profile.npz").write_bytes(b"not a profile")
    with pytest.raises(CodecError, match="query profile"):
        found.codec_options("cachegen")


def test_an_hq_schedule_travels_with_the_files_and_only_to_its_level(tmp_path) -> None:
    keys, values = [64, 96, 128], [17, 33, 49]
    save_model_files(MODEL, predictors={"default": _predictor()}, schedules={"hq": (keys, values)})
    assert "schedule" not in codec_options(MODEL, "cachegen")
    opts = codec_options(MODEL, "cachegen-hq")
    assert opts["schedule"] == (tuple(keys), tuple(values))
    kv = kv_like(layers=L, tokens=20, channels=C, seed=5)
    codec = get_codec("cachegen-hq", backend="cpu", **opts)
    assert codec.level.levels_for(L).tolist() == [keys, values]  # the model's depth: one count per layer
    blob = codec.encode(kv)
    # the counts travel in the container: a codec without the schedule decodes the same values
    plain = get_codec("cachegen-hq", backend="cpu", predictor=opts["predictor"])
    assert torch.equal(plain.decode(blob), codec.decode(blob))
    assert plain.encode(kv) != blob
    with pytest.raises(CodecError, match="level counts must lie in"):
        save_model_files(MODEL, schedules={"hq": ([1, 2, 3], [2, 2, 2])}, root=tmp_path)
    with pytest.raises(CodecError, match="as many key as value"):
        get_codec("cachegen", backend="cpu", schedule=([8, 8], [4]))
    hq_file = find_model_files(MODEL).schedules["hq"]
    with pytest.raises(CodecError, match="is for level 'hq', not 'default'"):
        get_codec("cachegen", backend="cpu", schedule=hq_file)
