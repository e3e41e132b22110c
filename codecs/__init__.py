"""kvmesh.codecs: KV-cache codecs behind one registry and one container format.

    from kvmesh.codecs import get_codec, CodecError
    codec = get_codec("cachegen", backend="auto")   # "auto" | "cpu" | "triton"
    blob = codec.encode(kv)                          # kv [2, layers, tokens, channels]
    kv2 = codec.decode(blob)
"""
from kvmesh.codecs.errors import CodecError
from kvmesh.codecs.registry import (
    ContainerInfo,
    available_methods,
    decode,
    get_codec,
    inspect,
    max_encoded_size,
    register,
)
from kvmesh.codecs import methods as _methods  # noqa: F401  (registers the built-in methods)

__all__ = [
    "CodecError",
    "ContainerInfo",
    "available_methods",
    "decode",
    "get_codec",
    "inspect",
    "max_encoded_size",
    "register",
]
