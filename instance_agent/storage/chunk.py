"""A chunk as a location stores it: raw KV or a codec's container."""
from __future__ import annotations

from dataclasses import dataclass

import torch

RAW = ""  # the method of a raw chunk


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """One chunk's KV: ``raw`` ([2, layers, tokens, channels]) when ``method`` is empty, else ``payload``.

    ``start``/``end`` are the tokens of the sequence the chunk holds; its key names the whole
    prefix up to ``end``.
    """

    key: str
    start: int
    end: int
    method: str = RAW
    raw: torch.Tensor | None = None
    payload: bytes | None = None
    # The key of the chunk before this one in its sequence ("" for the first, or unknown): how a
    # location evicts a sequence from its tail.
    parent: str = ""

    def __post_init__(self) -> None:
        if self.method == RAW and self.raw is None:
            raise ValueError(f"raw chunk {self.key} has no tensor")
        if self.method != RAW and self.payload is None:
            raise ValueError(f"chunk {self.key} encoded with {self.method!r} has no payload")

    @property
    def encoded(self) -> bool:
        return self.method != RAW

    @property
    def form(self) -> str:
        return "encoded" if self.encoded else "raw"

    @property
    def nbytes(self) -> int:
        if self.payload is not None and self.encoded:
            return len(self.payload)
        if self.raw is not None:
            return self.raw.numel() * self.raw.element_size()
        return 0
