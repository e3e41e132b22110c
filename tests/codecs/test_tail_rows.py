"""`cachegen` tail rows: a partial chunk's last rows kept at 8 bits (levels.Level.tail_for, codec.py).

The last chunk of a stored prompt is the only partial one, and the first tokens generated after the
prompt attend most to its last tokens. A level given ``tail_tokens`` (the model files' schedules carry
it) protects those rows in section 7, K and V, every layer; whole chunks are coded exactly as before, and
a decoder just follows the container's mask."""
from __future__ import annotations

import json

import pytest
import torch

from kvmesh.codecs import CodecError, container, get_codec
from kvmesh.codecs.cachegen.codec import make_codec, protected_rows
from kvmesh.codecs.cachegen.levels import LEVELS, SHORT_CHUNK, read_schedule, save_schedule, with_schedule
from kvmesh.codecs.model_files import find_model_files, save_model_files

from .conftest import kv_like

L, C = 3, 24
KEYS, VALUES = [20, 28, 14], [7, 7, 5]


def mask_of(blob: bytes, rest: int) -> torch.Tensor:
    """Section 7's row mask [2, L, rest] of a cachegen container."""
    section = bytes(container.unpack(blob)[1][7])
    bits = torch.tensor(list(section[:(2 * L * rest + 7) // 8]), dtype=torch.uint8)
    flat = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:2 * L * rest]
    return flat.bool().reshape(2, L, rest)


def test_named_levels_keep_no_tail_and_only_short_chunks_get_one() -> None:
    assert all(level.tail_tokens == 0 for level in LEVELS.values())
    level = with_schedule(LEVELS["default"], KEYS, VALUES, 16)
    assert [level.tail_for(t) for t in (1, 40, SHORT_CHUNK - 1, SHORT_CHUNK, 2 * SHORT_CHUNK)] == [16, 16, 16, 0, 0]
    assert with_schedule(LEVELS["default"], KEYS, VALUES).tail_tokens == 0


def test_a_whole_chunk_is_coded_exactly_as_without_a_tail() -> None:
    kv = kv_like(L, SHORT_CHUNK, C, seed=3)
    plain = get_codec("cachegen", backend="cpu", schedule=(KEYS, VALUES))
    tailed = get_codec("cachegen", backend="cpu", schedule=(KEYS, VALUES, 16))
    assert tailed.encode(kv) == plain.encode(kv)


@pytest.mark.parametrize("tokens", [40, 9])
def test_a_partial_chunks_last_rows_decode_at_8_bits(tokens: int) -> None:
    kv = kv_like(L, tokens, C, seed=4)
    plain = get_codec("cachegen", backend="cpu", schedule=(KEYS, VALUES))
    tailed = get_codec("cachegen", backend="cpu", schedule=(KEYS, VALUES, 16))
    blob = tailed.encode(kv)
    rest = tokens - 1  # the lead token is stored apart
    tail = min(16, rest)
    expected = protected_rows(kv[:, :, 1:].float(), LEVELS["default"].protect)
    expected[:, :, rest - tail:] = True
    assert torch.equal(mask_of(blob, rest), expected)
    x, out = kv.float(), tailed.decode(blob).float()
    assert torch.equal(plain.decode(blob), tailed.decode(blob)), "the decoder follows the container alone"
    err = (out - x)[:, :, tokens - tail:].abs()
    span = x[:, :, tokens - tail:].amax(-1, keepdim=True) - x[:, :, tokens - tail:].amin(-1, keepdim=True)
    assert bool((err <= span / 255 * 0.5 + 2e-3).all()), "tail rows are within half an 8-bit step (plus fp16)"
    plain_err = (plain.decode(plain.encode(kv)).float() - x)[:, :, tokens - tail:].abs().mean()
    assert float(err.mean()) < 0.25 * float(plain_err), "the tail is far more precise than the level's steps"
    assert len(blob) > len(plain.encode(kv))


def test_the_device_pipeline_writes_the_same_tail() -> None:
    from tests.codecs.test_triton_kernels import DEVICE, load_kernels

    load_kernels()
    kv = kv_like(L, 37, C, dtype=torch.float16, seed=5)
    cpu = get_codec("cachegen", backend="cpu", schedule=(KEYS, VALUES, 16))
    tri = get_codec("cachegen", backend="triton", schedule=(KEYS, VALUES, 16))
    blob = tri.encode(kv.to(DEVICE))
    assert blob == cpu.encode(kv)
    assert bool(mask_of(blob, 36)[:, :, -16:].all())


def test_schedule_files_carry_the_tail(tmp_path) -> None:
    path = save_schedule(tmp_path / "levels-default.json", "default", KEYS, VALUES, 16)
    assert json.loads(path.read_text())["tail_tokens"] == 16
    assert read_schedule(path) == ("default", tuple(KEYS), tuple(VALUES), 16)
    assert make_codec("default", schedule=path).level.tail_tokens == 16
    old = save_schedule(tmp_path / "old.json", "default", KEYS, VALUES)  # a file written before tails
    assert "tail_tokens" not in json.loads(old.read_text()) and read_schedule(old)[3] is None
    assert make_codec("default", schedule=old).level.tail_tokens == 0

    save_model_files("tests/tail", schedules={"default": (KEYS, VALUES, 16)}, root=tmp_path / "files")
    opts = find_model_files("tests/tail", [tmp_path / "files"]).codec_options("cachegen")
    assert opts["schedule"] == (tuple(KEYS), tuple(VALUES), 16)
    assert get_codec("cachegen", backend="cpu", **opts).level.tail_tokens == 16


@pytest.mark.parametrize("bad", [-1, 256, True, 2.0, "16"])
def test_a_bad_tail_is_refused_with_the_valid_range(tmp_path, bad) -> None:
    with pytest.raises(CodecError, match=r"tail_tokens must be an integer in \[0, 255\]"):
        with_schedule(LEVELS["default"], KEYS, VALUES, bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "kvmesh-level-schedule-1", "level": "default", "key_levels": KEYS,
                                "value_levels": VALUES, "tail_tokens": bad}))
    with pytest.raises(CodecError, match="tail_tokens"):
        read_schedule(path)
    with pytest.raises(CodecError, match="schedule must be"):
        make_codec("default", schedule=(KEYS,))
