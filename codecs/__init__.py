"""kvmesh.codecs: KV-cache codecs behind one registry and one container format.

    from kvmesh.codecs import get_codec, CodecError
    codec = get_codec("cachegen", backend="auto")   # "auto" | "cpu" | "triton"
    blob = codec.encode(kv)                          # kv [2, layers, tokens, channels]
    kv2 = codec.decode(blob)

    # cachegen rounds keys where the serving model's queries look least when given its query profile
    # (kvmesh.engine.query_profile computes one; the container and the decoder do not change)
    codec = get_codec("cachegen", key_profile=QueryProfile.load("smollm2.npz"))

    # and codes each layer as its residual from a prediction made of the layers before it when given
    # its layer predictor (kvmesh.engine.predictor fits one); decoding those containers needs it too
    codec = get_codec("cachegen", predictor=LayerPredictor.load("smollm2-layers.npz"))

    # both, found by the served model's name in its model-files folder (model_files.py)
    codec = get_codec("cachegen", **model_files.codec_options("HuggingFaceTB/SmolLM2-135M-Instruct"))
"""
from kvmesh.codecs.cachegen.predict import LayerPredictor
from kvmesh.codecs.cachegen.rounding import QueryProfile
from kvmesh.codecs.errors import CodecError
from kvmesh.codecs.registry import (
    ContainerInfo,
    available_methods,
    decode,
    get_codec,
    inspect,
    max_encoded_size,
    method_options,
    register,
    registered_methods,
)
from kvmesh.codecs import methods as _methods  # noqa: F401  (registers the built-in methods)
from kvmesh.codecs import model_files

__all__ = [
    "CodecError",
    "ContainerInfo",
    "available_methods",
    "decode",
    "get_codec",
    "inspect",
    "max_encoded_size",
    "method_options",
    "model_files",
    "LayerPredictor",
    "QueryProfile",
    "register",
    "registered_methods",
]
