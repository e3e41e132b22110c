"""The codec methods an agent offers: ``kvmesh.codecs``' registry plus codecs handed to the agent.

Extra codecs (a name and an object with ``encode(kv) -> bytes`` and ``decode(bytes) -> Tensor``)
let an embedding program or a test add a method without touching the codec registry.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Protocol

import torch

from kvmesh import codecs
from kvmesh.errors import InvalidArgument



PREDICTOR_FILE = "layer_predictor"
CACHEGEN_CODEC_ID = 2


def required_files(method: str, payload: bytes | None) -> list[str]:
    """The model files (as "kind:id") decoding ``payload`` needs: a cachegen container coded with
    cross-layer prediction names its layer predictor in its variant byte and section 8."""
    if not method or not payload:
        return []
    from kvmesh.codecs import container
    from kvmesh.codecs.cachegen.codec import container_variant

    try:
        if container.read_header(payload).codec_id != CACHEGEN_CODEC_ID:
            return []
        _, predictor = container_variant(payload)
    except ValueError:  # not a container this reader knows: decoding will say what is wrong
        return []
    return [f"{PREDICTOR_FILE}:{predictor.hex()}"] if predictor is not None else []


def describe_missing(missing: list[str], held: list[str], where: str) -> str:
    """A message naming the model files a chunk needs that ``where`` does not hold."""
    names = ", ".join(missing)
    return (f"it needs model file(s) {names} to decode, which {where} does not hold "
            f"(the config's model / model_files, or extra_config.cachegen_layer_predictor; held there: "
            f"{', '.join(held) or 'none'})")


class Codec(Protocol):
    def encode(self, kv: torch.Tensor) -> bytes: ...

    def decode(self, blob: bytes) -> torch.Tensor: ...


class CodecSet:
    """Method name -> codec, for the agent's threads.

    Registry codecs are made once per thread and method, so that no codec object (and whatever
    scratch state it keeps) is shared between threads encoding chunks at once; codecs handed in as
    ``extra`` are used as given.
    """

    def __init__(self, extra: Mapping[str, Codec] | None = None, options: Mapping[str, object] | None = None,
                 method_options: Mapping[str, Mapping[str, object]] | None = None) -> None:
        """options: keyword options for the registry's codecs, each passed to the methods that take
        it (codecs.method_options), e.g. {"key_profile": QueryProfile} for the cachegen levels.
        method_options: per method, options over those (the model's files: cachegen-hq has its own
        predictor and level schedule; AgentConfig.codec_options makes them)."""
        self._extra = dict(extra or {})
        self._registry = codecs
        self._options = {k: v for k, v in (options or {}).items() if v is not None}
        self._method_options = {m: {k: v for k, v in o.items() if v is not None}
                                for m, o in (method_options or {}).items()}
        self._local = threading.local()

    def available(self) -> list[str]:
        names: list[str] = []
        names.extend(self._registry.available_methods())
        names.extend(n for n in self._extra if n not in names)
        return names

    def model_files(self) -> list[str]:
        """The model files the codecs decode with, as "kind:id": a container coded against one
        (cachegen with a layer predictor) decodes only where the same file is held."""
        held: list[str] = []
        for opts in (self._options, *self._method_options.values()):
            predictor = opts.get("predictor")
            name = f"{PREDICTOR_FILE}:{predictor.ident.hex()}" if predictor is not None else None
            if name is not None and name not in held:
                held.append(name)
        return held

    def options_for(self, method: str) -> dict[str, object]:
        """The keyword options the registry's ``method`` is made with."""
        takes = self._registry.method_options(method)
        opts = {**self._options, **self._method_options.get(method, {})}
        return {k: v for k, v in opts.items() if k in takes}

    def missing_files(self, method: str, payload: bytes | None, held: list[str] | None = None) -> list[str]:
        """The model files a chunk encoded with ``method`` needs to decode that ``held`` (default:
        this agent's) lacks, as "kind:id". Reads only the container's header and variant byte."""
        needed = required_files(method, payload)
        have = self.model_files() if held is None else held
        return [f for f in needed if f not in have]

    def check(self, method: str) -> None:
        """InvalidArgument naming the available methods when ``method`` is not one of them."""
        if method not in self._extra and method not in self._registry.available_methods():
            avail = ", ".join(self.available()) or "none"
            raise InvalidArgument(f"unknown method {method!r}; available methods: {avail}")

    def get(self, method: str, start: int = 0) -> Codec:
        """The calling thread's codec for ``method``; InvalidArgument naming the available ones when unknown.
        start: where the chunk to encode begins in its sequence; a codec that writes a sequence's first
        chunk differently (cachegen's lead token, the attention sink) gives its writer for it
        (``for_chunk``). Decoding needs no start: containers say how they were written."""
        codec = self._get(method)
        for_chunk = getattr(codec, "for_chunk", None)
        return for_chunk(start) if start and for_chunk is not None else codec

    def _get(self, method: str) -> Codec:
        if method in self._extra:
            return self._extra[method]
        cache: dict[str, Codec] = self._local.__dict__.setdefault("codecs", {})
        codec = cache.get(method)
        if codec is not None:
            return codec
        self.check(method)
        codec = self._registry.get_codec(method, **self.options_for(method))  # "auto": Triton on a GPU for methods that have it
        cache[method] = codec
        return codec
