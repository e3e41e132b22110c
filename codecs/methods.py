"""Registers the built-in methods. Codec ids are wire ids: never renumber, only append."""
from __future__ import annotations

from kvmesh.codecs.errors import CodecError
from kvmesh.codecs.lossless import LosslessCodec
from kvmesh.codecs.quantized import Fp8Codec, UniformCodec
from kvmesh.codecs.registry import register


def _cpu_only(name: str, make_codec):
    def make(backend: str):
        if backend == "triton":
            raise CodecError(f"method {name!r} has no triton backend; use backend='cpu' or 'auto'")
        return make_codec()
    return make


register("lossless", 1, _cpu_only("lossless", LosslessCodec))
register("int8", 3, _cpu_only("int8", lambda: UniformCodec("int8", 3, 8)))
register("int4", 4, _cpu_only("int4", lambda: UniformCodec("int4", 4, 4)))
register("fp8", 5, _cpu_only("fp8", Fp8Codec))
