"""What every codec offers, and the input checks they share."""
from __future__ import annotations

import abc

import torch

from kvmesh.codecs import container
from kvmesh.codecs.errors import CodecError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kv(kv: object) -> torch.Tensor:
    """Validates a KV tensor [2, layers, tokens, channels] and returns it; CodecError otherwise."""
    kv = check_kv_structure(kv)
    # one max-reduction: it propagates NaN and inf alike, and costs a tenth of isfinite(kv).all()
    # on CPU fp16 (which was the largest single step of a cachegen encode)
    if not bool(torch.isfinite(kv.abs().amax())):
        raise CodecError("kv contains inf or NaN values; refusing to encode")
    return kv


def check_kv_structure(kv: object) -> torch.Tensor:
    """check_kv's checks that need no look at the values (a device pipeline checks those as flags)."""
    if not isinstance(kv, torch.Tensor):
        raise CodecError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dtype not in SUPPORTED_DTYPES:
        raise CodecError(f"kv dtype must be float16, bfloat16 or float32, got {kv.dtype}")
    if kv.dim() != 4 or kv.shape[0] != 2:
        raise CodecError(f"kv must have shape [2, layers, tokens, channels], got {list(kv.shape)}")
    if any(d < 1 for d in kv.shape[1:]):
        raise CodecError(f"kv needs at least one layer, token and channel, got {list(kv.shape)}")
    if any(d >= 2**32 for d in kv.shape):
        raise CodecError(f"kv dimension too large: {list(kv.shape)}")
    return kv


def shape_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class Codec(abc.ABC):
    """A KV-cache codec: encode a [2, layers, tokens, channels] tensor to a container and back."""

    #: method name as registered (e.g. "cachegen-hq")
    name: str
    #: the container's codec id (container.py's wire ids)
    codec_id: int
    #: the container's level id
    level_id: int = 0

    @abc.abstractmethod
    def encode(self, kv: torch.Tensor) -> bytes:
        """Encodes kv (fp16/bf16/fp32, any device) into a self-describing container."""

    @abc.abstractmethod
    def decode(self, blob: bytes, device: torch.device | str | None = None) -> torch.Tensor:
        """Decodes a container into a tensor of the original shape and dtype; CodecError if corrupt."""

    @abc.abstractmethod
    def max_encoded_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """An upper bound on len(encode(kv)) for any kv of this shape and dtype."""

    def _unpack(self, blob: bytes, n_sections: int | tuple[int, ...]) -> tuple[container.Header, list[memoryview]]:
        """Checks the container belongs to this codec and has the expected number of sections (or one of them)."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise CodecError(f"blob must be bytes, got {type(blob).__name__}")
        header, sections = container.unpack(blob)
        if header.codec_id != self.codec_id:
            from kvmesh.codecs.registry import method_for_ids

            raise CodecError(
                f"container was written by codec {method_for_ids(header.codec_id, header.level_id)!r}, not {self.name!r}")
        allowed = (n_sections,) if isinstance(n_sections, int) else n_sections
        if len(sections) not in allowed:
            raise CodecError(f"corrupt container: {len(sections)} sections, {self.name} writes "
                             f"{' or '.join(map(str, allowed))}")
        if header.shape[0] != 2 or any(d < 1 for d in header.shape):
            raise CodecError(f"corrupt container: bad shape {header.shape}")
        return header, sections
