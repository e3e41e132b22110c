"""The container, the registry and the public API, independent of any one codec's math."""
from __future__ import annotations

import os

import pytest
import torch

import kvmesh.codecs as codecs
from kvmesh.codecs import CodecError, container, get_codec

from .conftest import bits, kv_like


def test_codec_error_is_value_error():
    assert issubclass(CodecError, ValueError)


def test_available_methods_lists_contract_methods(monkeypatch):
    monkeypatch.delenv(codecs.registry.ENV_EXTRA_METHODS, raising=False)
    methods = codecs.available_methods()
    for name in ("cachegen", "cachegen-hq", "cachegen-compact", "lossless", "fp8", "int8", "int4"):
        assert name in methods
    for name in methods:
        assert get_codec(name, backend="cpu").name == name


def test_lmcache_is_registered_but_listed_only_when_configured(monkeypatch):
    """The comparison method decodes and is reachable by name, but agents (which offer
    available_methods()) list it only when KVMESH_EXTRA_METHODS names it."""
    monkeypatch.delenv(codecs.registry.ENV_EXTRA_METHODS, raising=False)
    assert "lmcache-cachegen" not in codecs.available_methods()
    assert "lmcache-cachegen" in codecs.registered_methods()
    assert get_codec("lmcache-cachegen").name == "lmcache-cachegen"
    assert "lmcache-cachegen" in codecs.available_methods(extra=("lmcache-cachegen",))
    monkeypatch.setenv(codecs.registry.ENV_EXTRA_METHODS, "lmcache-cachegen")
    assert "lmcache-cachegen" in codecs.available_methods()
    monkeypatch.setenv(codecs.registry.ENV_EXTRA_METHODS, "lmcache-cachegen, zip")
    with pytest.raises(CodecError, match="unknown methods 'zip'; registered: .*lmcache-cachegen"):
        codecs.available_methods()


def test_unknown_method_and_backend_raise():
    with pytest.raises(CodecError, match="unknown codec method"):
        get_codec("zip")
    with pytest.raises(CodecError, match="backend"):
        get_codec("lossless", backend="tpu")
    with pytest.raises(CodecError, match="takes no option 'level'"):
        get_codec("cachegen", level="hq")


def test_levels_are_methods():
    assert get_codec("cachegen", backend="cpu").name == "cachegen"
    assert get_codec("cachegen-hq", backend="cpu").name == "cachegen-hq"
    assert get_codec("cachegen-compact", backend="cpu").name == "cachegen-compact"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_triton_without_gpu_or_interpreter_is_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(CodecError, match="GPU"):
        get_codec("cachegen", backend="triton")
    assert get_codec("cachegen", backend="auto").name == "cachegen"


def test_inspect_reports_header():
    kv = kv_like(dtype=torch.bfloat16)
    blob = get_codec("lossless").encode(kv)
    info = codecs.inspect(blob)
    assert (info.method, info.level, info.dtype, info.shape, info.nbytes) == (
        "lossless", "default", torch.bfloat16, tuple(kv.shape), len(blob))


def test_module_decode_dispatches_on_header():
    kv = kv_like()
    blob = get_codec("lossless").encode(kv)
    assert torch.equal(bits(codecs.decode(blob)), bits(kv))


def test_foreign_and_garbage_containers_raise():
    with pytest.raises(CodecError, match="magic"):
        codecs.inspect(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CodecError):
        codecs.inspect(b"")
    with pytest.raises(CodecError):
        get_codec("lossless").decode("not bytes")  # type: ignore[arg-type]
    for seed in range(50):
        rnd = os.urandom(seed * 7 + 1)
        with pytest.raises(CodecError):
            codecs.decode(rnd)
    # a well-formed container of an unknown codec id
    blob = container.pack(200, 0, torch.float16, (2, 1, 1, 1), [b"x"])
    with pytest.raises(CodecError, match="unknown codec"):
        codecs.inspect(blob)


def test_newer_format_version_is_rejected():
    blob = bytearray(get_codec("lossless").encode(kv_like()))
    blob[4] = container.FORMAT_VERSION + 1
    with pytest.raises(CodecError, match="version"):
        codecs.inspect(bytes(blob))


@pytest.mark.parametrize("bad", [
    "tensor", "dtype", "rank", "first-dim", "empty", "nan", "inf"])
def test_bad_input_is_clear_error(bad):
    kv = kv_like(dtype=torch.float32)
    arg = {
        "tensor": kv.numpy(),
        "dtype": kv.to(torch.float64),
        "rank": kv[0],
        "first-dim": torch.cat([kv, kv]),
        "empty": kv[:, :, :0],
        "nan": kv.clone().index_put_((torch.tensor([1]), torch.tensor([0]), torch.tensor([3]), torch.tensor([2])),
                                     torch.tensor(float("nan"))),
        "inf": kv.clone().index_put_((torch.tensor([0]), torch.tensor([2]), torch.tensor([0]), torch.tensor([0])),
                                     torch.tensor(float("-inf"))),
    }[bad]
    for name in codecs.registered_methods():
        with pytest.raises(CodecError):
            get_codec(name, backend="cpu").encode(arg)
