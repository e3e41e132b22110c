"""Which backend get_codec picks: "auto" takes Triton only for methods that have Triton kernels."""
from __future__ import annotations

import pytest
import torch

from kvmesh.codecs import CodecError, get_codec, registered_methods

CPU_ONLY = ("lossless", "int8", "int4", "fp8", "lmcache-cachegen")


@pytest.mark.parametrize("name", CPU_ONLY)
def test_auto_on_a_gpu_host_gives_cpu_only_methods_their_cpu_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stands in for a GPU host by making torch report CUDA (no GPU here); nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    codec = get_codec(name, backend="auto")
    kv = torch.randn(2, 2, 5, 6, dtype=torch.float16)
    assert codec.decode(codec.encode(kv)).shape == kv.shape


@pytest.mark.parametrize("name", CPU_ONLY)
def test_asking_a_cpu_only_method_for_triton_names_what_it_has(name: str) -> None:
    with pytest.raises(CodecError, match=rf"{name!r} has no triton backend; it has: cpu"):
        get_codec(name, backend="triton")


def test_every_method_has_a_cpu_backend() -> None:
    for name in registered_methods():
        assert get_codec(name, backend="cpu").name == name
