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



class Codec(Protocol):
    def encode(self, kv: torch.Tensor) -> bytes: ...

    def decode(self, blob: bytes) -> torch.Tensor: ...


class CodecSet:
    """Method name -> codec, for the agent's threads.

    Registry codecs are made once per thread and method, so that no codec object (and whatever
    scratch state it keeps) is shared between threads encoding chunks at once; codecs handed in as
    ``extra`` are used as given.
    """

    def __init__(self, extra: Mapping[str, Codec] | None = None, options: Mapping[str, object] | None = None) -> None:
        """options: keyword options for the registry's codecs, each passed to the methods that take
        it (codecs.method_options), e.g. {"key_profile": QueryProfile} for the cachegen levels."""
        self._extra = dict(extra or {})
        self._registry = codecs
        self._options = {k: v for k, v in (options or {}).items() if v is not None}
        self._local = threading.local()

    def available(self) -> list[str]:
        names: list[str] = []
        names.extend(self._registry.available_methods())
        names.extend(n for n in self._extra if n not in names)
        return names

    def model_files(self) -> list[str]:
        """The model files the codecs decode with, as "kind:id": a container coded against one
        (cachegen with a layer predictor) decodes only where the same file is held."""
        predictor = self._options.get("predictor")
        return [f"layer_predictor:{predictor.ident.hex()}"] if predictor is not None else []

    def check(self, method: str) -> None:
        """InvalidArgument naming the available methods when ``method`` is not one of them."""
        if method not in self._extra and method not in self._registry.available_methods():
            avail = ", ".join(self.available()) or "none"
            raise InvalidArgument(f"unknown method {method!r}; available methods: {avail}")

    def get(self, method: str) -> Codec:
        """The calling thread's codec for ``method``; InvalidArgument naming the available ones when unknown."""
        if method in self._extra:
            return self._extra[method]
        cache: dict[str, Codec] = self._local.__dict__.setdefault("codecs", {})
        codec = cache.get(method)
        if codec is not None:
            return codec
        self.check(method)
        takes = self._registry.method_options(method)
        opts = {k: v for k, v in self._options.items() if k in takes}
        codec = self._registry.get_codec(method, **opts)  # "auto": Triton on a GPU for methods that have it
        cache[method] = codec
        return codec
