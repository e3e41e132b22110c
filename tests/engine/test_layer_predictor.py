"""The layer predictor of the real SmolLM2 (kvmesh.engine.predictor) and cachegen's cross-layer
prediction with it: fitted on one text, it saves bytes on the KV of another at the same error."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from kvmesh.codecs import LayerPredictor, get_codec
from kvmesh.engine.predictor import kv_chunks, layer_predictor, main
from kvmesh.engine.profile import text_windows

FIT_TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his "
            "father had taught him, and at the top he wiped the salt from the great lens before lighting "
            "the lamp. Ships passed far out on the dark water; none of them knew his name. ") * 6


def long_text(kind: str) -> str:
    """Real English text every Python has: the language reference's topics (to fit on) and the
    license's history and terms (to test on)."""
    if kind == "fit":
        import pydoc_data.topics

        return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return (Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt").read_text()


@pytest.fixture(scope="module")
def predictor(smollm2_model: Any, smollm2_tokenizer: Any) -> LayerPredictor:
    return layer_predictor(smollm2_model, text_windows(smollm2_tokenizer, long_text("fit"), limit=4))


def test_fitted_for_every_layer(predictor: LayerPredictor) -> None:
    assert (predictor.layers, predictor.channels) == (30, 192)
    assert predictor.key_weights.shape == (29, 384, 192) and predictor.value_weights.shape == (29, 576, 192)


def test_prediction_saves_bytes_on_other_text_at_the_same_error(smollm2_model: Any, smollm2_tokenizer: Any,
                                                                 predictor: LayerPredictor) -> None:
    chunk = next(kv_chunks(smollm2_model, text_windows(smollm2_tokenizer, long_text("test"), window=256, limit=1)))
    assert chunk.shape == (2, 30, 256, 192)
    plain = get_codec("cachegen", backend="cpu")
    predicted = get_codec("cachegen", backend="cpu", predictor=predictor)
    a, b = plain.encode(chunk), predicted.encode(chunk)
    x = chunk.float()
    err = [float((c.decode(blob).float() - x).norm() / x.norm()) for c, blob in ((plain, a), (predicted, b))]
    assert len(b) < 0.94 * len(a), (len(a), len(b))  # 8.6% smaller here, from a fit on 4 x 1,024 tokens
    assert err[1] < 1.15 * err[0], err


def test_command_line_writes_a_loadable_predictor(tmp_path, capsys, smollm2: Any) -> None:
    text = tmp_path / "prose.txt"
    text.write_text(FIT_TEXT, encoding="utf-8")
    out = tmp_path / "layers.npz"
    assert main(["--text", str(text), "--out", str(out), "--windows", "1"]) == 0
    p = LayerPredictor.load(out)
    assert (p.layers, p.channels) == (30, 192)
    assert p.ident.hex() in capsys.readouterr().out


def test_fitting_needs_whole_chunks(smollm2_model: Any) -> None:
    with pytest.raises(ValueError, match="at least one chunk"):
        layer_predictor(smollm2_model, [[1, 2, 3]])
