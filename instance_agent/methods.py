"""The codec methods an agent offers: ``kvmesh.codecs``' registry plus codecs handed to the agent.

Extra codecs (a name and an object with ``encode(kv) -> bytes`` and ``decode(bytes) -> Tensor``)
let an embedding program or a test add a method without touching the codec registry.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from kvmesh.errors import InvalidArgument

logger = logging.getLogger(__name__)


class Codec(Protocol):
    def encode(self, kv: torch.Tensor) -> bytes: ...

    def decode(self, blob: bytes) -> torch.Tensor: ...


def _registry() -> Any | None:
    try:
        from kvmesh import codecs
    except ImportError as err:  # the codec package is optional for a storage-only agent
        logger.warning("kvmesh.codecs cannot be imported (%s): no codec methods from it", err)
        return None
    if not hasattr(codecs, "available_methods") or not hasattr(codecs, "get_codec"):
        logger.warning("kvmesh.codecs offers no get_codec/available_methods yet: no codec methods from it")
        return None
    return codecs


class CodecSet:
    """Method name -> codec, built once per agent; codec objects are cached and shared by threads."""

    def __init__(self, extra: Mapping[str, Codec] | None = None) -> None:
        self._extra = dict(extra or {})
        self._registry = _registry()
        self._cache: dict[str, Codec] = {}
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        names: list[str] = []
        if self._registry is not None:
            names.extend(self._registry.available_methods())
        names.extend(n for n in self._extra if n not in names)
        return names

    def get(self, method: str) -> Codec:
        """The codec for ``method``; InvalidArgument naming the available ones when unknown."""
        with self._lock:
            codec = self._cache.get(method)
            if codec is not None:
                return codec
            if method in self._extra:
                codec = self._extra[method]
            elif self._registry is not None and method in self._registry.available_methods():
                try:
                    codec = self._registry.get_codec(method)
                except self._registry.CodecError as err:
                    # "auto" picks Triton on a GPU host, which CPU-only methods refuse: use their CPU path.
                    logger.info("method %s: %s; using its CPU backend", method, err)
                    codec = self._registry.get_codec(method, backend="cpu")
            else:
                avail = ", ".join(self.available()) or "none"
                raise InvalidArgument(f"unknown method {method!r}; available methods: {avail}")
            self._cache[method] = codec
            return codec
