"""Making a model's codec files (kvmesh.engine.calibrate) for the real SmolLM2 on a tiny text: the files
load, are found by the model's name, and make a codec that round-trips the model's KV; the folder
appears whole; the CLI does the same."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvmesh.codecs import QueryProfile, get_codec
from kvmesh.codecs.model_files import find_model_files, model_key
from kvmesh.engine import calibrate
from kvmesh.engine.calibrate import Recipe, calibration_windows, corpus_files, make_model_files

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his "
        "father had taught him, and at the top he wiped the salt from the great lens before lighting "
        "the lamp. Ships passed far out on the dark water; none of them knew his name. ") * 6
NAME = "tests/tiny-calibration"
TINY = Recipe(windows=1)


def _only_folder(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, smollm2: Any) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("model-files")
    lines: list[str] = []
    folder = make_model_files(*smollm2, NAME, root, lines.append, texts={"tiny.txt": TEXT}, recipe=TINY)
    return folder, lines


def test_the_packaged_corpus_is_small_and_readable() -> None:
    files = corpus_files()
    assert files and all(p.suffix == ".txt" for p in files)
    assert sum(p.stat().st_size for p in files) < 300_000
    readme = files[0].parent / "README.md"
    assert readme.is_file() and "licen" in readme.read_text().lower()


def test_windows_take_every_text_in_turn(smollm2_tokenizer: Any) -> None:
    texts = {"a": "alpha beta gamma " * 400, "b": "one two three " * 400}
    ws = calibration_windows(smollm2_tokenizer, texts, 3, window=256)
    assert len(ws) == 3 and all(len(w) == 256 for w in ws)
    assert smollm2_tokenizer.decode(ws[0]).strip().startswith("alpha")
    assert smollm2_tokenizer.decode(ws[1]).strip().startswith("one")
    with pytest.raises(ValueError, match="no window"):
        calibration_windows(smollm2_tokenizer, {"short": "too short"}, 4)


def test_files_are_found_by_name_and_round_trip_the_models_kv(made: tuple[Path, list[str]], smollm2: Any) -> None:
    folder, lines = made
    assert folder.name == model_key(NAME)
    assert _only_folder(folder.parent) == [folder.name]  # no staging folder left behind
    found = find_model_files(NAME, roots=[folder.parent])
    assert found is not None and found.key_profile is not None and "default" in found.predictors
    assert "hq" in found.schedules and "default" in found.schedules
    assert found.codec_options("cachegen")["schedule"] == (*map(tuple, calibrate._schedule("default", "tuned", 30)),
                                                            calibrate.Recipe.tail_tokens)
    assert calibrate.recipe_version(folder) == calibrate.RECIPE_VERSION
    assert (folder / calibrate.RECIPE_FILE).is_file()
    assert any("wrote" in line for line in lines) and any("window 1/1" in line for line in lines)
    model, tokenizer = smollm2
    ids = tokenizer("A different sentence about rivers and bridges, long enough to fill a chunk. " * 30,
                    add_special_tokens=False)["input_ids"][:256]
    _, chunks = calibrate.measure(model, [ids])
    kv = chunks[0]
    x = kv.float()
    for method in ("cachegen", "cachegen-hq"):
        errs = []
        for codec in (get_codec(method, backend="cpu"), get_codec(method, backend="cpu", **found.codec_options(method))):
            out = codec.decode(codec.encode(kv))
            assert out.shape == kv.shape
            errs.append(float((out.float() - x).norm() / x.norm()))
        # files fitted on ~300 tokens of other text: the error stays that of the codec without them
        assert errs[1] < 1.5 * errs[0], (method, errs)


def test_remaking_replaces_the_folder_whole(made: tuple[Path, list[str]], smollm2: Any) -> None:
    folder, _ = made
    before = find_model_files(NAME, roots=[folder.parent])
    assert before is not None
    before_id = before.codec_options()["predictor"].ident  # loaded now: the paths stay, the files change
    texts = {"other.txt": TEXT.replace("lighthouse", "windmill")}
    again = make_model_files(*smollm2, NAME, folder.parent, texts=texts, recipe=TINY)
    after = find_model_files(NAME, roots=[folder.parent])
    assert again == folder and _only_folder(folder.parent) == [folder.name]
    assert after is not None and after.codec_options()["predictor"].ident != before_id


def test_command_line_makes_the_builtin_models_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     smollm2: Any) -> None:
    text = tmp_path / "prose.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "files"
    assert calibrate.main([calibrate.BUILTIN_MODEL, "--out", str(out), "--text", str(text), "--windows", "1"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(out / model_key(calibrate.BUILTIN_MODEL))
    assert "calibration:" in printed.err
    found = find_model_files(calibrate.BUILTIN_MODEL, roots=[out])
    assert found is not None and found.key_profile is not None
    assert QueryProfile.load(found.key_profile).layers == 30


def test_command_line_rejects_what_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        calibrate.main(["some/model", "--text", str(tmp_path / "missing.txt")])
    assert "cannot read calibration text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        calibrate.main(["some/model", "--windows", "0"])
    with pytest.raises(SystemExit, match="cannot load model"):
        calibrate.main([str(tmp_path / "no-such-model"), "--text", __file__, "--windows", "1"])


def test_a_failed_make_leaves_nothing(tmp_path: Path, smollm2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = calibrate.save_model_files

    def half_written(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # every file written, then the disk "fills up"
        raise OSError("no space left on device")

    monkeypatch.setattr(calibrate, "save_model_files", half_written)
    with pytest.raises(OSError, match="no space"):
        make_model_files(*smollm2, NAME, tmp_path, texts={"tiny.txt": TEXT}, recipe=TINY)
    assert find_model_files(NAME, roots=[tmp_path]) is None
    assert _only_folder(tmp_path) == []


def test_schedules_are_resolved_to_the_models_depth_from_a_known_source() -> None:
    keys, values = calibrate._schedule("default", "tuned", 30)
    assert (tuple(keys), tuple(values)) == calibrate.TUNED_SCHEDULES["default"]
    keys12, values12 = calibrate._schedule("default", "tuned", 12)  # a shallower model samples the table
    assert len(keys12) == len(values12) == 12 and keys12[0] == keys[0] and keys12[-1] == keys[-3]
    assert calibrate._schedule("hq", "builtin", 30)[0] == list(calibrate.LEVELS["hq"].key_levels)
    with pytest.raises(ValueError, match="valid: builtin$"):
        calibrate._schedule("hq", "tuned", 30)
    with pytest.raises(ValueError, match="valid: builtin, tuned"):
        calibrate._schedule("default", "guessed", 30)
